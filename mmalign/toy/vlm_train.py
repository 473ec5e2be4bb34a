"""The toy VLM: a tiny LLaVA (CLIP vision tower + Llama LM, real transformers classes) with a
word-level tokenizer, pretrained by supervised answers on rendered train scenes.

    python -m mmalign.toy.train vlm --out mmalign/toy/assets [--minutes 14] [--seed 0]

The run is seeded and stops early, on purpose, at the first held-out evaluation whose
overall hallucination rate is at or below `--vlm-stop` (default 0.35), so the shipped model
is imperfect and preference tuning has room. train_info.json records steps, minutes,
device and the final held-out hallucination rate per question type. Loads with
AutoModelForImageTextToText + AutoProcessor, and as `generator: {name: vlm, pretrained:
toy:vlm_toy}`.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import torch
from PIL import Image

from mmalign.data.vlm import EncodedPrompt, VLMEncoder, build_sequences

from .vlm_world import COUNT_WORDS, QTYPES, eval_set, evaluate, question_of, split_scenes
from .world import COLORS, SHAPES

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<image>", "<|im_start|>", "<|im_end|>"]
WORDS = (
    [
        "user",
        "assistant",
        "system",
        "what",
        "color",
        "colour",
        "is",
        "the",
        "how",
        "many",
        "there",
        "describe",
        "image",
        "a",
        "an",
        "and",
        "to",
        "left",
        "of",
        "above",
        "yes",
        "no",
        "?",
        ".",
        ",",
    ]
    + list(COUNT_WORDS)
    + list(COLORS)
    + list(SHAPES)
    + [s + "s" for s in SHAPES]
)
IMAGE_TOKEN = "<image>"

VISION_CFG = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8
)
TEXT_CFG = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=128,
)


def chat_template() -> str:
    return (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
        "{% if c['type'] == 'image' %}<image>{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
        "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )


def make_word_tokenizer():
    """Word-level `PreTrainedTokenizerFast` over the toy vocabulary (builds offline)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + WORDS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="<|im_end|>",
        unk_token="<unk>",
        additional_special_tokens=SPECIALS[4:],
    )


def build_toy_vlm(seed: int = 0):
    """(LlavaForConditionalGeneration with random weights, LlavaProcessor): 32x32 images -> 16 image tokens."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tok = make_word_tokenizer()
    vocab = 8 * ((len(tok) + 7) // 8)
    torch.manual_seed(seed)
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(**VISION_CFG),
        text_config=LlamaConfig(
            vocab_size=vocab,
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            tie_word_embeddings=False,
            **TEXT_CFG,
        ),
        image_token_index=tok.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        projector_hidden_act="gelu",
    )
    model = LlavaForConditionalGeneration(cfg)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    ip = CLIPImageProcessor(
        size={"shortest_edge": 32},
        crop_size={"height": 32, "width": 32},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    proc = LlavaProcessor(
        image_processor=ip,
        tokenizer=tok,
        patch_size=VISION_CFG["patch_size"],
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=chat_template(),
    )
    return model, proc


# ------------------------------------------------------------------ pretraining


class _Examples:
    """Supervised (image, question, answer) batches from a pre-rendered pool of train scenes.

    Prompt and response ids are cached per distinct question / answer text (there are few),
    pixel values are computed once for the pool."""

    def __init__(self, processor, n_scenes: int, seed: int):
        self.enc = VLMEncoder(processor)
        self.scenes = split_scenes("train", n_scenes, seed)
        ims = [s.render() for s in self.scenes]
        self.pixels = processor.image_processor(ims, return_tensors="pt")["pixel_values"]
        self.rng = random.Random(f"vlm-pretrain|{seed}")
        self._prompt: dict[str, torch.Tensor] = {}
        self._resp: dict[tuple[str, str], torch.Tensor] = {}

    def _ids(self, question: str, answer: str):
        if question not in self._prompt:  # any image gives the same ids: only the ids are kept
            self._prompt[question] = self.enc.encode_prompt([Image.new("RGB", (32, 32))], question).ids
        key = (question, answer)
        if key not in self._resp:
            self._resp[key] = self.enc.encode_response(1, question, answer)
        return self._prompt[question], self._resp[key]

    def batch(self, size: int) -> dict:
        prompts, responses = [], []
        while len(prompts) < size:
            i = self.rng.randrange(len(self.scenes))
            qa = question_of(self.rng.choice(QTYPES), self.rng, self.scenes[i])
            if qa is None:
                continue
            p, r = self._ids(qa.question, qa.answer)
            prompts.append(EncodedPrompt(p, {}, {"pixel_values": self.pixels[i : i + 1]}))
            responses.append(r)
        return build_sequences(prompts, responses, self.enc.pad_id, "right")


def _loss(model, seqs: dict) -> torch.Tensor:
    out = model(input_ids=seqs["input_ids"], attention_mask=seqs["attention_mask"], **seqs["vision"], use_cache=False)
    logits = out.logits[:, :-1].float()
    labels = seqs["input_ids"][:, 1:].masked_fill(seqs["loss_mask"][:, 1:] == 0, -100)
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


def pretrain_vlm(
    out: Path,
    minutes: float = 14.0,
    seed: int = 0,
    max_steps: int | None = None,
    stop_at: float = 0.35,
    eval_every: int = 200,
    batch: int = 64,
    lr: float = 1e-3,
    warmup: int = 100,
    n_scenes: int = 4000,
    log=print,
) -> dict:
    """Train the toy VLM by supervised answers; stop at the first held-out eval with overall
    hallucination <= stop_at (or the time / step cap); save to <out>/vlm_toy."""
    random.seed(seed)
    torch.manual_seed(seed)
    model, proc = build_toy_vlm(seed)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"toy VLM: {n_params / 1e6:.2f} M parameters; rendering {n_scenes} train scenes")
    data = _Examples(proc, n_scenes, seed)
    probe = eval_set("heldout", 60, seed=1)  # early-stopping probe (the final report uses another set)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    t0, step, history = time.time(), 0, []
    model.train()
    while True:
        loss = _loss(model, data.batch(batch))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        step += 1
        if step % 50 == 0:
            log(f"step {step} loss {loss.item():.3f} ({(time.time() - t0) / 60:.1f} min)")
        done = (max_steps is not None and step >= max_steps) or time.time() - t0 > minutes * 60
        if step % eval_every == 0 or done:
            r = evaluate(model, proc, probe)
            history.append({"step": step, "minutes": (time.time() - t0) / 60, "heldout_probe": r})
            log(f"step {step}: held-out hallucination " + " ".join(f"{k}={v:.2f}" for k, v in r.items() if k != "n"))
            if r["overall"] <= stop_at:
                done = True
        if done:
            break
    minutes_done = (time.time() - t0) / 60
    model.eval()
    final = evaluate(model, proc, eval_set("heldout", 200, seed=0))
    train_final = evaluate(model, proc, eval_set("train", 100, seed=0))
    dest = Path(out) / "vlm_toy"
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest, safe_serialization=True)
    proc.save_pretrained(dest)
    info = {
        "steps": step,
        "minutes": minutes_done,
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "seed": seed,
        "batch": batch,
        "lr": lr,
        "warmup": warmup,
        "n_scenes": n_scenes,
        "stop_at": stop_at,
        "params": n_params,
        "heldout_hallucination": final,
        "train_hallucination": train_final,
        "eval": "greedy answers; held-out: eval_set('heldout', 200, seed=0), train: eval_set('train', 100, seed=0)",
        "history": history,
    }
    (dest / "train_info.json").write_text(json.dumps(info, indent=2))
    log(
        f"saved {dest}: {step} steps, {minutes_done:.1f} min; held-out hallucination "
        + " ".join(f"{k}={v:.2f}" for k, v in final.items() if k != "n")
    )
    return info
