"""The core shared by the VLM judge and the audio-LM judge (private; registers nothing).

A judge turns a chat model's next-token distribution into a scalar with one forward pass
(no `generate`): the question is rendered with the processor's chat template and a
generation prompt, the media go through the processor, and we read the log-probabilities of
chosen answer tokens at the last position.

    yes/no (VQAScore, Lin et al. 2024, "Evaluating Text-to-Visual Generation with
            Image-to-Text Generation"):  P(Yes) / (P(Yes) + P(No))   (or P(Yes) alone)
    Likert:     E[rating] = sum_k v_k p_k / sum_k p_k over the rating tokens
    pairwise:   P(first) = p_1 / (p_1 + p_2) over the two answer tokens

Each answer must be a single token *in context* (after the generation prompt); this is
checked once at load time with a clear error.

Pairwise position bias: chat judges favour the item shown first, so `swap_average: true` (the
default) asks both orders and returns (P1(a, b) + 1 - P1(b, a)) / 2, where P1(x, y) =
`prefer_first(x, y)` is P(first better) with x shown first. A judge that always answers "1"
then gives 0.5 (no preference) instead of always preferring a.

Precision: `dtype: auto` (the default) loads the judge in bfloat16 when it runs on CUDA (the
chat models' released dtype; a 7B judge needs about 16 GB instead of 33 GB in float32) and
float32 on CPU; an explicit dtype wins. The judge runs on `device`, or on CUDA when available.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from mmalign.config import num

from .common import check_batch, module_device, torch_dtype


def check_template(template: str, field_name: str, needs: Sequence[str]) -> None:
    for key in needs:
        if "{" + key + "}" not in template:
            raise ValueError(f"{field_name}: template must contain {{{key}}}")
    try:
        template.format(prompt="x", n=5)
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(f"{field_name}: bad template ({e}); only {{prompt}} and {{n}} are filled") from None


def judge_device(device: str | None) -> str:
    """Where the judge runs: `device` if given, else CUDA when available, else CPU."""
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(dtype: str, device: str) -> str:
    """`auto` -> bfloat16 on a CUDA device, float32 elsewhere; any other value is kept."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if torch.device(device).type == "cuda" else "float32"


def _load_model(model_id: str, dtype: str, auto_classes: Sequence[str]):
    import transformers

    errors = []
    for cls_name in auto_classes:
        cls = getattr(transformers, cls_name, None)
        if cls is None:
            continue
        try:
            return cls.from_pretrained(model_id, dtype=torch_dtype(dtype))
        except ValueError as e:  # "Unrecognized configuration class ... for this kind of AutoModel"
            errors.append(f"{cls_name}: {str(e).splitlines()[0]}")
    raise ValueError(f"{model_id}: no chat model class fits ({'; '.join(errors)})")


class ChatJudge:
    """Chat template + processor + one forward pass -> log-probs of answer tokens."""

    def __init__(
        self,
        model: str,
        processor: str | None,
        device: str | None,
        dtype: str,
        auto_classes: Sequence[str],
        media_item: Callable[[], dict],
    ):
        from transformers import AutoProcessor

        self.processor = AutoProcessor.from_pretrained(processor or model)
        self.tokenizer = getattr(self.processor, "tokenizer", None)
        if self.tokenizer is None:
            raise ValueError(f"{processor or model}: the processor has no tokenizer")
        if (
            getattr(self.processor, "chat_template", None) is None
            and getattr(self.tokenizer, "chat_template", None) is None
        ):
            raise ValueError(f"{processor or model}: neither the processor nor the tokenizer has a chat template")
        self.tokenizer.padding_side = "left"  # the last position is then the next-token position for every row
        device = judge_device(device)
        self.dtype = resolve_dtype(dtype, device)
        self.model = _load_model(model, self.dtype, auto_classes).eval().requires_grad_(False).to(device)
        self.media_item = media_item
        params = inspect.signature(self.model.forward).parameters
        self._logits_to_keep = "logits_to_keep" in params
        self._answer_cache: dict[str, int] = {}

    @property
    def device(self) -> torch.device:
        return module_device(self.model)

    def render(self, question: str, n_media: int = 1, media_labels: Sequence[str] | None = None) -> str:
        content: list[dict] = []
        for i in range(n_media):
            if media_labels:
                content.append({"type": "text", "text": media_labels[i]})
            content.append(self.media_item())
        content.append({"type": "text", "text": question})
        messages = [{"role": "user", "content": content}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def _continuation(self, prefix: str, answer: str) -> list[int] | None:
        pre = self.tokenizer(prefix, add_special_tokens=False)["input_ids"]
        full = self.tokenizer(prefix + answer, add_special_tokens=False)["input_ids"]
        return full[len(pre) :] if full[: len(pre)] == pre else None

    def answer_id(self, answer: str) -> int:
        """The one token id of `answer` as the model would emit it after the generation prompt.

        The answer is tokenized in context (generation prompt + answer). If that is not one
        token but " " + answer is (templates ending in "ASSISTANT:" with SentencePiece
        vocabularies), the spaced form is used.
        """
        if answer in self._answer_cache:
            return self._answer_cache[answer]
        messages = [{"role": "user", "content": [{"type": "text", "text": "Answer."}]}]
        prefix = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        extra = self._continuation(prefix, answer)
        if (extra is None or len(extra) != 1) and not answer.startswith(" "):
            spaced = self._continuation(prefix, " " + answer)
            if spaced is not None and len(spaced) == 1:
                extra = spaced
        if extra is None or len(extra) != 1:
            toks = self.tokenizer.convert_ids_to_tokens(extra) if extra else []
            raise ValueError(
                f"answer {answer!r} is {len(extra or [])} tokens {toks} after the chat template's generation prompt "
                f"for this tokenizer; judge answers must be single tokens (choose other answer strings)"
            )
        unk = getattr(self.tokenizer, "unk_token_id", None)
        if unk is not None and extra[0] == unk:
            raise ValueError(f"answer {answer!r} is the unknown token for this tokenizer")
        self._answer_cache[answer] = extra[0]
        return extra[0]

    def next_token_logprobs(self, texts: list[str], media_kwargs: dict[str, Any]) -> Tensor:
        """[B, V] log-softmax of the next token after each rendered text."""
        inputs = self.processor(text=texts, padding=True, return_tensors="pt", **media_kwargs)
        mtype = self.model.dtype
        inputs = {
            k: (v.to(self.device, mtype) if torch.is_floating_point(v) else v.to(self.device))
            for k, v in inputs.items()
            if isinstance(v, Tensor)
        }
        extra = {"logits_to_keep": 1} if self._logits_to_keep else {}
        with torch.no_grad():
            logits = self.model(**inputs, **extra).logits
        mask = inputs.get("attention_mask")
        if mask is not None and self.tokenizer.padding_side != "left" and not extra:
            last = mask.long().cumsum(1).argmax(1)
            logits = logits[torch.arange(len(logits)), last]
        else:
            logits = logits[:, -1]
        return torch.log_softmax(logits.float(), dim=-1)


def logsumexp_ids(logp: Tensor, ids: Sequence[int]) -> Tensor:
    """log sum_{t in ids} p(t): [B]."""
    return torch.logsumexp(logp[:, list(ids)], dim=-1)


def yes_probability(logp: Tensor, yes_ids: Sequence[int], no_ids: Sequence[int], normalize: bool = True) -> Tensor:
    """P(Yes)/(P(Yes)+P(No)) (normalize) or P(Yes) under the full softmax."""
    ly = logsumexp_ids(logp, yes_ids)
    if not normalize:
        return ly.exp()
    return torch.sigmoid(ly - logsumexp_ids(logp, no_ids))


def expected_rating(logp: Tensor, rating_ids: Sequence[int], values: Sequence[float]) -> Tensor:
    """sum_k v_k p_k / sum_k p_k over the rating tokens."""
    w = torch.softmax(logp[:, list(rating_ids)], dim=-1)
    return (w * torch.tensor(list(values), dtype=w.dtype, device=w.device)).sum(-1)


def first_probability(logp: Tensor, first_ids: Sequence[int], second_ids: Sequence[int]) -> Tensor:
    return torch.sigmoid(logsumexp_ids(logp, first_ids) - logsumexp_ids(logp, second_ids))


@dataclass
class JudgeScoring:
    """Config fields shared by the judges (mixed into their config dataclasses)."""

    mode: Literal["yes_no", "likert", "pairwise"] = "yes_no"  # pairwise: only .prefer(); __call__ refuses
    yes_answers: list[str] = field(default_factory=lambda: ["Yes"])
    no_answers: list[str] = field(default_factory=lambda: ["No"])
    normalize_yes_no: bool = True
    likert_n: int = num(5, ge=2)
    rating_answers: list[str] | None = None  # default "1".."likert_n"
    pair_answers: list[str] = field(default_factory=lambda: ["1", "2"])  # answer meaning first / second
    swap_average: bool = True  # pairwise: average P(a first) and 1 - P(b first) (position-bias debiasing)
    batch_size: int = num(8, ge=1)
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"  # auto: bfloat16 on CUDA, float32 on CPU
    device: str | None = None  # default: CUDA when available

    def validate_scoring(self) -> None:
        for f in ("yes_answers", "no_answers", "pair_answers"):
            if not getattr(self, f):
                raise ValueError(f"{f}: give at least one answer string")
        if len(self.pair_answers) != 2:
            raise ValueError("pair_answers: exactly two answers (first, second)")
        if self.rating_answers is not None and len(self.rating_answers) < 2:
            raise ValueError("rating_answers: at least two ratings")
        if self.likert_n < 2:
            raise ValueError("likert_n: at least 2")
        if self.batch_size < 1:
            raise ValueError("batch_size: must be >= 1")
        check_template(self.yes_no_template, "yes_no_template", ["prompt"])
        check_template(self.likert_template, "likert_template", ["prompt"])
        check_template(self.pairwise_template, "pairwise_template", ["prompt"])


class JudgeBase:
    """Modality-independent judge logic; subclasses say how media enter the processor."""

    differentiable = False
    n_labels: Sequence[str] = ()

    def __init__(self, cfg: Any, judge: ChatJudge, name: str):
        self.cfg, self.judge, self.name = cfg, judge, name
        # answer variants that map to one token count once (e.g. "Yes"/"yes" in an uncased vocab)
        self.yes_ids = list(dict.fromkeys(judge.answer_id(a) for a in cfg.yes_answers))
        self.no_ids = list(dict.fromkeys(judge.answer_id(a) for a in cfg.no_answers))
        if set(self.yes_ids) & set(self.no_ids):
            raise ValueError(f"reward {name!r}: yes_answers and no_answers share a token")
        ratings = cfg.rating_answers or [str(i) for i in range(1, cfg.likert_n + 1)]
        self.rating_ids = [judge.answer_id(a) for a in ratings]
        if len(set(self.rating_ids)) != len(self.rating_ids):
            raise ValueError(f"reward {name!r}: two rating answers are the same token")
        self.rating_values = [float(i) for i in range(1, len(ratings) + 1)]
        self.pair_ids = [judge.answer_id(a) for a in cfg.pair_answers]
        if self.pair_ids[0] == self.pair_ids[1]:
            raise ValueError(f"reward {name!r}: the two pair_answers are the same token")

    @property
    def scores_single(self) -> bool:
        """False with `mode: pairwise`: the judge then only compares two samples (`prefer`) and has
        no per-sample score, so evaluation reports no reward column for it."""
        return self.cfg.mode != "pairwise"

    # subclasses: list of per-sample media objects, processor kwargs for a flat list of them, and
    # the device of the samples' tensor (scores are returned there)
    def media_list(self, samples: Any) -> list: ...

    def media_kwargs(self, flat_media: list) -> dict: ...

    def sample_device(self, samples: Any) -> torch.device: ...

    def _question(self, template: str, prompt: str) -> str:
        return template.format(prompt=prompt, n=len(self.rating_ids))

    def _batched(self, texts: list[str], media_per_text: list[list]) -> Tensor:
        bs, out = self.cfg.batch_size, []
        for i in range(0, len(texts), bs):
            flat = [m for ms in media_per_text[i : i + bs] for m in ms]
            out.append(self.judge.next_token_logprobs(texts[i : i + bs], self.media_kwargs(flat)))
        return torch.cat(out)

    def score_media(self, media: list, prompts: Sequence[str], mode: str | None = None) -> Tensor:
        mode = mode or self.cfg.mode
        if mode == "yes_no":
            texts = [self.judge.render(self._question(self.cfg.yes_no_template, p)) for p in prompts]
            logp = self._batched(texts, [[m] for m in media])
            return yes_probability(logp, self.yes_ids, self.no_ids, self.cfg.normalize_yes_no)
        if mode == "likert":
            texts = [self.judge.render(self._question(self.cfg.likert_template, p)) for p in prompts]
            logp = self._batched(texts, [[m] for m in media])
            return expected_rating(logp, self.rating_ids, self.rating_values)
        raise ValueError(
            f"reward {self.name!r}: mode {mode!r} scores single samples only with yes_no or likert; "
            f"use .prefer(a, b, prompts) for pairwise"
        )

    def first_media(self, media_a: list, media_b: list, prompts: Sequence[str]) -> Tensor:
        """P1(a, b): P(first is better) with a shown first, one order only."""
        texts = [self.judge.render(self._question(self.cfg.pairwise_template, p), 2, self.n_labels) for p in prompts]
        logp = self._batched(texts, [[a, b] for a, b in zip(media_a, media_b)])
        return first_probability(logp, self.pair_ids[:1], self.pair_ids[1:])

    def prefer_media(self, media_a: list, media_b: list, prompts: Sequence[str]) -> Tensor:
        """P(a is better) for each pair: (P1(a, b) + 1 - P1(b, a)) / 2 with swap_average, else P1(a, b)."""
        p_ab = self.first_media(media_a, media_b, prompts)
        if not self.cfg.swap_average:
            return p_ab
        return 0.5 * (p_ab + 1.0 - self.first_media(media_b, media_a, prompts))

    def _pair_media(self, samples_a: Any, samples_b: Any, prompts: Sequence[str]) -> tuple[list, list]:
        a, b = self.media_list(samples_a), self.media_list(samples_b)
        if len(a) != len(b):
            raise ValueError(f"reward {self.name!r}: prefer() got {len(a)} and {len(b)} samples")
        check_batch(self.name, len(a), prompts)
        return a, b

    def prefer(self, samples_a: Any, samples_b: Any, prompts: Sequence[str]) -> Tensor:
        """[B] P(sample a is better than sample b for its prompt) (both orders with swap_average)."""
        a, b = self._pair_media(samples_a, samples_b, prompts)
        return self.prefer_media(a, b, prompts).to(self.sample_device(samples_a))

    def prefer_first(self, samples_a: Any, samples_b: Any, prompts: Sequence[str]) -> Tensor:
        """[B] P1(a, b): P(first is better) with a shown first; swap_average not applied. For
        callers that ask both orders themselves (eval-judge, D3PO) and measure position bias."""
        a, b = self._pair_media(samples_a, samples_b, prompts)
        return self.first_media(a, b, prompts).to(self.sample_device(samples_a))
