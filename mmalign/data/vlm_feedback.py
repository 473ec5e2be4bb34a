"""AI-feedback preference pairs for VLMs: the online / iterative loop's data step.

For each item (image path(s), prompt[, reference answer]):

- `rejected="worst"` (RLAIF): sample K responses from the policy with `generator.rollout`
  (temperature / top-p from the generator config), score each with a `scorer`, and keep
  chosen = the best, rejected = the worst, `margin` = their score difference (MM-DPO's
  dynamic β reads it). Items whose K scores all tie are dropped and counted.
- `rejected="perturb"` (POVID, Zhou et al. 2024, "Aligning Modalities in Vision Large
  Language Models via Preference Fine-tuning"): chosen = the item's reference answer,
  rejected = `perturb(image, prompt, reference)` (an attribute, count or object changed).
  No sampling; with a scorer the margin is score(chosen) − score(rejected), else 0.

A scorer is any callable `(images: list[PIL.Image], prompts: list[str], responses: list[str])
-> Tensor[N]` (higher = better; one entry per response, the item's first image):
`judge_scorer(reward)` wraps an image reward such as `vlm_judge`, `rule_scorer(fn)` any
Python function. The output is `pairs.jsonl` in the row format `mmalign.data.vlm.read_rows`
reads (image paths relative to it).

Items are JSONL rows with `image` | `images` | `image_path`, `prompt` | `question`, and an
optional reference answer (`reference` | `answer` | `chosen`); relative image paths are
relative to the items file, as for preference rows.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image
from torch import Tensor

from mmalign.data.preference import DataError, jsonl_rows
from mmalign.data.vlm import VLMRow, load_row_images
from mmalign.media import pil_to_tensor
from mmalign.types import Samples

Scorer = Callable[[list[Image.Image], list[str], list[str]], Tensor]
Perturb = Callable[[Image.Image, str, str], str]

DEFAULT_JUDGE_TEMPLATE = "Question: {prompt}\nAnswer: {response}\nIs the answer correct? Please answer yes or no."
REFERENCE_KEYS = ("reference", "answer", "chosen")


# --------------------------------------------------------------------------- items


@dataclass
class FeedbackItem:
    images: list[str]  # paths (absolute, or as given when absolute)
    prompt: str
    reference: str | None = None
    name: str = ""  # "file:line"
    extra: dict[str, Any] = field(default_factory=dict)  # other keys of the row, copied to the pair

    def row(self) -> VLMRow:
        return VLMRow(list(self.images), self.prompt, name=self.name)


def read_items(path: str | Path, check_images: bool = True) -> list[FeedbackItem]:
    """Items from a JSONL file; with `check_images` every image is opened now, so a missing or
    corrupt one is a `MediaError` naming the file and the row before any model loads."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: items file not found")
    items = []
    for where, raw in jsonl_rows(p):
        if not isinstance(raw, dict):
            raise DataError(f"{where}: expected a JSON object")
        img = next((raw[k] for k in ("images", "image", "image_path") if raw.get(k) is not None), None)
        if img is None:
            raise DataError(f"{where}: no image (expected a key 'image', 'images' or 'image_path')")
        imgs = img if isinstance(img, list) else [img]
        if not imgs or not all(isinstance(x, str) for x in imgs):
            raise DataError(f"{where}: image: expected a path or a list of paths")
        imgs = [x if Path(x).is_absolute() else str(p.parent / x) for x in imgs]
        prompt = raw.get("prompt", raw.get("question"))
        if not isinstance(prompt, str) or not prompt.strip():
            raise DataError(f"{where}: missing or empty 'prompt' (or 'question')")
        ref = next((raw[k] for k in REFERENCE_KEYS if raw.get(k) is not None), None)
        if ref is not None and not isinstance(ref, str):
            raise DataError(f"{where}: reference answer: expected a string, got {type(ref).__name__}")
        skip = {"images", "image", "image_path", "prompt", "question", "rejected", "margin", *REFERENCE_KEYS}
        item = FeedbackItem(imgs, prompt, ref, where, {k: v for k, v in raw.items() if k not in skip})
        if check_images:
            load_row_images(item.row())
        items.append(item)
    if not items:
        raise DataError(f"{p}: no items")
    return items


# --------------------------------------------------------------------------- scorers


def rule_scorer(fn: Callable[[Image.Image, str, str], float | bool]) -> Scorer:
    """A scorer from `fn(image, prompt, response) -> float | bool` (e.g. an exact checker)."""

    def score(images: list[Image.Image], prompts: list[str], responses: list[str]) -> Tensor:
        return torch.tensor([float(fn(im, p, r)) for im, p, r in zip(images, prompts, responses, strict=True)])

    return score


def compose_texts(template: str, prompts: Sequence[str], responses: Sequence[str], n: int = 5) -> list[str]:
    """The judge's question for each (prompt, response): `template` filled with {prompt},
    {response} (and {n}, the number of ratings, for Likert templates)."""
    return [template.format(prompt=p, response=r, n=n) for p, r in zip(prompts, responses, strict=True)]


def judge_scorer(reward: Any, template: str = DEFAULT_JUDGE_TEMPLATE, batch_size: int = 16) -> Scorer:
    """A scorer from an image reward (e.g. `vlm_judge`): the reward scores (image, text) with
    text = `template` filled with the question and the response.

    The judges of rewards/ put their `prompt` into their own `yes_no_template` /
    `likert_template` (VQAScore's 'Does this figure show "{prompt}"?' by default); build the
    judge with that template set to "{prompt}" so the composed text is the whole question
    (`mmalign pairs` does). Images are scored together when they share a size."""
    if getattr(reward, "modality", None) != "image":
        raise ValueError(
            f"judge {getattr(reward, 'name', reward)!r}: modality {getattr(reward, 'modality', None)!r}; "
            f"the pair builder needs a judge that scores images (modality 'image')"
        )
    for key in ("prompt", "response"):
        if "{" + key + "}" not in template:
            raise ValueError(f"judge template: must contain {{{key}}}, got {template!r}")
    try:
        template.format(prompt="x", response="y", n=5)
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(
            f"judge template: bad template ({e}); only {{prompt}}, {{response}} and {{n}} are filled"
        ) from None
    cfg = getattr(reward, "cfg", None)
    mode = getattr(cfg, "mode", None)
    own = getattr(cfg, f"{mode}_template", None) if mode else None
    if own is not None and own.strip() != "{prompt}":
        warnings.warn(
            f"judge {reward.name!r}: its {mode}_template {own!r} wraps the composed question; "
            f"set {mode}_template: '{{prompt}}' to pass the pair builder's template as is",
            stacklevel=2,
        )
    n = len(getattr(reward, "rating_ids", [])) or 5

    def score(images: list[Image.Image], prompts: list[str], responses: list[str]) -> Tensor:
        texts = compose_texts(template, prompts, responses, n)
        if len(images) != len(texts):
            raise ValueError(f"judge scorer: {len(images)} images for {len(texts)} responses")
        out = torch.zeros(len(texts))
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, im in enumerate(images):
            by_size.setdefault(im.size, []).append(i)
        for idx in by_size.values():
            for s in range(0, len(idx), batch_size):
                chunk = idx[s : s + batch_size]
                x = torch.stack([pil_to_tensor(images[i]) for i in chunk])
                out[chunk] = reward(Samples(images=x), [texts[i] for i in chunk]).detach().float().cpu()
        return out

    return score


# --------------------------------------------------------------------------- builder


@dataclass
class FeedbackConfig:
    num_samples: int = 4  # K responses per item (rejected: worst)
    rejected: Literal["worst", "perturb"] = "worst"
    include_reference: bool = False  # worst: the item's reference answer joins the K candidates
    batch_size: int = 8  # items per rollout call
    max_new_tokens: int | None = None  # default: the generator config's
    seed: int = 0
    tie_tol: float = 0.0  # best − worst <= tie_tol counts as a tie

    def validate(self) -> None:
        if self.rejected not in ("worst", "perturb"):
            raise ValueError(f"rejected: expected 'worst' or 'perturb', got {self.rejected!r}")
        if self.rejected == "worst" and self.num_samples < 2:
            raise ValueError(f"num_samples: K must be >= 2 to rank responses, got {self.num_samples}")
        if self.batch_size < 1:
            raise ValueError("batch_size: must be >= 1")
        if self.tie_tol < 0:
            raise ValueError("tie_tol: must be >= 0")


@dataclass
class FeedbackReport:
    path: Path
    items: int = 0
    pairs: int = 0
    ties_dropped: int = 0  # every candidate scored the same (or best and worst are the same text)
    no_reference: int = 0  # perturb / include_reference: items without a reference answer (skipped)

    def __str__(self) -> str:
        s = f"{self.pairs} pairs from {self.items} items -> {self.path}; {self.ties_dropped} dropped as ties"
        return s + (f", {self.no_reference} skipped without a reference answer" if self.no_reference else "")


def _first_image(item: FeedbackItem) -> Image.Image:
    return load_row_images(item.row())[0]


def _pair_row(item: FeedbackItem, out_dir: Path, chosen: str, rejected: str, margin: float, **info: Any) -> dict:
    images = [os.path.relpath(Path(x).resolve(), out_dir.resolve()) for x in item.images]
    return {
        **item.extra,
        "images": images,
        "prompt": item.prompt,
        "chosen": chosen,
        "rejected": rejected,
        "margin": margin,
        **info,
    }


def build_feedback_pairs(
    generator: Any,
    items: Sequence[FeedbackItem] | str | Path,
    scorer: Scorer | None,
    num_samples: int = 4,
    out_dir: str | Path = "pairs",
    *,
    rejected: Literal["worst", "perturb"] = "worst",
    perturb: Perturb | None = None,
    include_reference: bool = False,
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    seed: int = 0,
    tie_tol: float = 0.0,
    log: Callable[[str], Any] = print,
) -> FeedbackReport:
    """Write `out_dir/pairs.jsonl` (see the module docstring) and return the counts.

    `items`: `FeedbackItem`s or the path of an items JSONL. `generator`: anything with
    `rollout(prompts, images=..., num_samples=K, max_new_tokens=...)` returning samples.text
    prompt-major (`VLMGenerator`); unused for rejected="perturb"."""
    cfg = FeedbackConfig(num_samples, rejected, include_reference, batch_size, max_new_tokens, seed, tie_tol)
    cfg.validate()
    if rejected == "worst" and scorer is None:
        raise ValueError("scorer: rejected='worst' ranks sampled responses and needs a scorer")
    if rejected == "perturb" and perturb is None:
        raise ValueError("perturb: rejected='perturb' needs a perturbation function (image, prompt, reference) -> str")
    if not isinstance(items, (list, tuple)):
        items = read_items(items)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = FeedbackReport(out / "pairs.jsonl", items=len(items))
    rows: list[dict] = []
    torch.manual_seed(seed)
    for start in range(0, len(items), cfg.batch_size):
        chunk = list(items[start : start + cfg.batch_size])
        need_ref = rejected == "perturb" or include_reference
        if need_ref:
            report.no_reference += sum(it.reference is None for it in chunk)
            chunk = [it for it in chunk if it.reference is not None]
        if not chunk:
            continue
        images = [_first_image(it) for it in chunk]
        if rejected == "perturb":
            rows += _perturbed(chunk, images, scorer, perturb, out, report, tie_tol)
            continue
        roll = generator.rollout(
            [it.prompt for it in chunk],
            images=[it.images for it in chunk],
            num_samples=num_samples,
            max_new_tokens=max_new_tokens,
        )
        texts = [t.strip() for t in roll.samples.text]
        cands = [
            texts[i * num_samples : (i + 1) * num_samples] + ([it.reference] if include_reference else [])
            for i, it in enumerate(chunk)
        ]
        flat_im = [im for im, c in zip(images, cands) for _ in c]
        flat_p = [it.prompt for it, c in zip(chunk, cands) for _ in c]
        flat_r = [r for c in cands for r in c]
        scores = scorer(flat_im, flat_p, flat_r).detach().float().cpu().reshape(-1)
        if scores.numel() != len(flat_r) or not torch.isfinite(scores).all():
            raise ValueError(f"scorer: expected {len(flat_r)} finite scores, got {scores.tolist()}")
        k = 0
        for it, c in zip(chunk, cands):
            s = scores[k : k + len(c)].tolist()
            k += len(c)
            best = max(range(len(c)), key=lambda j: s[j])
            worst = min(range(len(c)), key=lambda j: s[j])
            margin = s[best] - s[worst]
            if margin <= tie_tol or c[best] == c[worst]:
                report.ties_dropped += 1
                continue
            rows.append(
                _pair_row(
                    it,
                    out,
                    c[best],
                    c[worst],
                    margin,
                    chosen_score=s[best],
                    rejected_score=s[worst],
                    scores=s,
                    rejected_from="policy",
                )
            )
    tmp = report.path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(report.path)
    report.pairs = len(rows)
    log(str(report))
    return report


def _perturbed(
    chunk: list[FeedbackItem],
    images: list[Image.Image],
    scorer: Scorer | None,
    perturb: Perturb,
    out: Path,
    report: FeedbackReport,
    tie_tol: float,
) -> list[dict]:
    """POVID: chosen = the reference answer, rejected = its perturbation."""
    bad = [perturb(im, it.prompt, it.reference) for im, it in zip(images, chunk)]
    for it, b in zip(chunk, bad):
        if not isinstance(b, str):
            raise ValueError(f"{it.name}: perturb returned {type(b).__name__}, expected a string")
    margins = [0.0] * len(chunk)
    if scorer is not None:
        n = len(chunk)
        s = (
            scorer(images + images, [it.prompt for it in chunk] * 2, [it.reference for it in chunk] + bad)
            .detach()
            .float()
            .cpu()
            .reshape(-1)
            .tolist()
        )
        margins = [s[i] - s[n + i] for i in range(n)]
    rows = []
    for it, b, m in zip(chunk, bad, margins):
        if b.strip() == it.reference.strip() or (scorer is not None and (m <= tie_tol or math.isnan(m))):
            report.ties_dropped += 1
            continue
        rows.append(_pair_row(it, out, it.reference, b, m, rejected_from="perturbed"))
    return rows
