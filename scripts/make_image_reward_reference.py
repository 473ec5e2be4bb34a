"""Record the ORIGINAL ImageReward's scores on a tiny model, for tests/unit/rewards/test_rewards_image_reward.py.

Writes tests/fixtures/image_reward_reference.json: the original model's state_dict key names
and shapes, the prompts, the token ids its tokenizer produced, and its scores. The weights
themselves are not stored: they are `det_state_dict(keys, seed)` from rewards/fixtures.py
(a splitmix64 hash of the key name and element index, the same in any environment), which
the test rebuilds, saves as an ImageReward.pt and loads through the adapter's key mapping.

What runs is the released code of the `image-reward` package (1.5), unmodified:
ImageReward.ImageReward.ImageReward (its MLP, mean/std, tokenizer call, PIL transform, score
and inference_rank) on BLIP_Pretrain with med.py's BertModel and vit.py's VisionTransformer.
Only sizes are patched, from outside: `create_vit` builds vit.py's VisionTransformer at the
tiny sizes instead of ViT-L/224, `init_tokenizer` reads a tiny BERT vocab instead of
downloading bert-base-uncased (adding [DEC] / [ENC] exactly as BLIP does), the MLP's input is
the tiny text width, the PIL transform is _transform(32), and med_config.json is BLIP's with
tiny sizes. The package's __init__ (which imports clip, diffusers, ReFL) is bypassed by
registering the package directories without running them.

How it was run (the package needs transformers < 5; nothing here touches the project venv):

    pip download image-reward==1.5 --no-deps -d /tmp/ir && unzip /tmp/ir/*.whl -d /tmp/ir/src
    python -m venv /tmp/irvenv
    # reuse the project's torch/torchvision/numpy/PIL; the venv's own packages shadow the rest
    # (run from the repository root)
    echo "$PWD/.venv/lib/python3.11/site-packages" > /tmp/irvenv/lib/python3.11/site-packages/zz_main.pth
    /tmp/irvenv/bin/pip install --no-deps transformers==4.46.3 tokenizers==0.20.3 huggingface_hub==0.26.5 timm==0.6.13
    /tmp/irvenv/bin/pip install wheel setuptools
    /tmp/irvenv/bin/pip install --no-deps --no-build-isolation fairscale==0.4.13
    /tmp/irvenv/bin/python scripts/make_image_reward_reference.py --image-reward-src /tmp/ir/src
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys
import tempfile
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "fixtures" / "image_reward_reference.json"

PROMPTS = [
    "a red circle",
    "A blue square left of a green triangle, photo.",
    "a cat and a dog",
    # longer than max_length=35 tokens: exercises truncation
    "a red circle above a blue square and a green triangle left of a cat and a dog on the right of "
    "the image , please rate how well this picture matches the prompt with one number from 1 to 10",
]
IMAGE_SETS = [  # (n, height, width): 32x32 is the model's size (no resize); 40x52 is resized and cropped
    (3, 32, 32),
    (3, 40, 52),
]
SEED = 0


def load_fixtures():
    """rewards/fixtures.py by path (its top level imports only json, pathlib and torch)."""
    spec = importlib.util.spec_from_file_location("mmalign_fixtures", ROOT / "rewards" / "fixtures.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def import_original(src: Path):
    """Import ImageReward.ImageReward and its BLIP modules without running the package __init__s."""
    for name, rel in (("ImageReward", "ImageReward"), ("ImageReward.models", "ImageReward/models")):
        pkg = types.ModuleType(name)
        pkg.__path__ = [str(src / rel)]
        sys.modules[name] = pkg
    blip_pretrain = importlib.import_module("ImageReward.models.BLIP.blip_pretrain")
    vit = importlib.import_module("ImageReward.models.BLIP.vit")
    ir = importlib.import_module("ImageReward.ImageReward")
    return ir, blip_pretrain, vit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--image-reward-src", required=True, help="directory holding the unpacked ImageReward package")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()

    import torch
    import transformers
    from PIL import Image

    fx = load_fixtures()
    t = fx.TINY_IMAGE_REWARD
    ir, blip_pretrain, vit = import_original(Path(args.image_reward_src))
    tmp = Path(tempfile.mkdtemp(prefix="ir-ref-"))
    tok_dir = fx.write_bert_tokenizer(tmp / "tokenizer")
    vocab = fx.bert_vocab()
    med_config = {  # BLIP's configs/med_config.json at tiny sizes
        "architectures": ["BertModel"],
        "attention_probs_dropout_prob": 0.1,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "hidden_size": t["text_width"],
        "initializer_range": 0.02,
        "intermediate_size": t["text_intermediate"],
        "layer_norm_eps": 1e-12,
        "max_position_embeddings": t["max_position_embeddings"],
        "model_type": "bert",
        "num_attention_heads": t["text_heads"],
        "num_hidden_layers": t["text_layers"],
        "pad_token_id": 0,
        "type_vocab_size": 2,
        "vocab_size": len(vocab) + 2,
        "encoder_width": t["vision_width"],
        "add_cross_attention": True,
    }
    (tmp / "med_config.json").write_text(json.dumps(med_config))

    def tiny_vit(vit_name, image_size, use_grad_checkpointing=False, ckpt_layer=0, drop_path_rate=0):
        enc = vit.VisionTransformer(
            img_size=t["image_size"],
            patch_size=t["patch_size"],
            embed_dim=t["vision_width"],
            depth=t["vision_layers"],
            num_heads=t["vision_heads"],
            use_grad_checkpointing=use_grad_checkpointing,
            ckpt_layer=ckpt_layer,
            drop_path_rate=0.1,
        )  # as create_vit('large'); identity in eval mode
        return enc, t["vision_width"]

    def tiny_tokenizer():  # blip.init_tokenizer with a local vocabulary
        tok = transformers.BertTokenizer.from_pretrained(tok_dir)
        tok.add_special_tokens({"bos_token": "[DEC]"})
        tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
        tok.enc_token_id = tok.additional_special_tokens_ids[0]
        return tok

    blip_pretrain.create_vit = tiny_vit
    blip_pretrain.init_tokenizer = tiny_tokenizer
    original_mlp = ir.MLP
    ir.MLP = lambda input_size: original_mlp(t["text_width"])  # ImageReward hard-codes MLP(768)

    model = ir.ImageReward(med_config=str(tmp / "med_config.json"), device="cpu")
    model.preprocess = ir._transform(t["image_size"])  # ImageReward hard-codes _transform(224)
    model.eval()
    keys = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    sd = fx.det_state_dict(keys, SEED)
    model.load_state_dict(sd, strict=True)  # the key list is the original's, complete

    tok = model.blip.tokenizer
    enc = tok(PROMPTS, padding="max_length", truncation=True, max_length=35)
    image_sets = []
    with torch.no_grad():
        for n, h, w in IMAGE_SETS:
            u8 = fx.det_images(n, h, w, SEED)
            pil = [Image.fromarray(u8[i].permute(1, 2, 0).numpy()) for i in range(n)]
            pairs = [model.score(PROMPTS[i], pil[i]) for i in range(n)]  # image i with prompt i
            last = [model.score(PROMPTS[-1], pil[i]) for i in range(n)]  # every image with the long prompt
            _, rank_rewards = model.inference_rank(PROMPTS[0], pil)  # one prompt, all images
            image_sets.append(
                {
                    "n": n,
                    "height": h,
                    "width": w,
                    "pair_scores": pairs,
                    "long_prompt_scores": last,
                    "rank_prompt0_scores": rank_rewards,
                }
            )
            print(f"{h}x{w}: pairs {pairs}\n       long {last}\n       rank {rank_rewards}")

    ref = {
        "about": "Scores of the original ImageReward code (image-reward 1.5) on a tiny model; "
        "made by scripts/make_image_reward_reference.py. Weights: rewards/fixtures.py "
        "det_state_dict(keys, seed) in the original key layout.",
        "versions": {
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "timm": importlib.import_module("timm").__version__,
            "image-reward": "1.5",
        },
        "seed": SEED,
        "tiny": t,
        "med_config": med_config,
        "mean": model.mean,
        "std": model.std,
        "keys": keys,
        "prompts": PROMPTS,
        "input_ids": enc["input_ids"],
        "attention_mask": enc["attention_mask"],
        "image_sets": image_sets,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(ref, indent=1) + "\n")
    print(f"wrote {args.out} ({Path(args.out).stat().st_size} bytes, {len(keys)} keys)")


if __name__ == "__main__":
    main()
