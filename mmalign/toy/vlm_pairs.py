"""Preference pairs from the toy VLM world, written as a JSONL of rows + PNG images that
`data: {kind: vlm, path: "toy:vlm_pairs"}` reads like any other VLM preference file.

For each train scene and each question type: chosen = the correct answer; rejected = the
pretrained toy VLM's own wrong answer (the most frequent wrong one among K samples at
temperature 1, an on-policy hallucination) or, when all K samples are right, a POVID-style
perturbed answer (an attribute, count or object changed). `toy:vlm_pairs_perturbed` uses
perturbed rejections only.

Pairs are materialised once into a cache directory ($MMALIGN_CACHE, default
~/.cache/mmalign) keyed by the recipe and the shipped model's weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from . import ASSETS
from .vlm_world import QA, Scene, answer_questions, check_answer, questions_for, split_scenes, wrong_answer

VERSION = "toy-vlm-pairs-v1"


@dataclass(frozen=True)
class PairRecipe:
    rejected: str = "self"  # "self": the model's own wrong answer (perturbed if none) | "perturbed"
    n_scenes: int = 300  # train scenes; one question of each applicable type per scene
    samples: int = 4  # K sampled answers per question (rejected: self)
    temperature: float = 1.0
    seed: int = 0

    def validate(self) -> None:
        if self.rejected not in ("self", "perturbed"):
            raise ValueError(f"rejected: expected 'self' or 'perturbed', got {self.rejected!r}")
        if self.n_scenes <= 0 or self.samples <= 0:
            raise ValueError("n_scenes and samples: must be positive")


SPECS = {"toy:vlm_pairs": PairRecipe(), "toy:vlm_pairs_perturbed": PairRecipe(rejected="perturbed")}


def build_pairs(model, processor, recipe: PairRecipe) -> list[tuple[Scene, QA, str, str, str]]:
    """(scene, question, chosen, rejected, where the rejection came from: "policy" | "perturbed")
    for every train question of the recipe; the checker accepts every chosen and rejects every
    rejected."""
    recipe.validate()
    rng = random.Random(f"{VERSION}|{recipe.seed}")
    items = [
        (sc, qa)
        for sc in split_scenes("train", recipe.n_scenes, seed=100 + recipe.seed)
        for qa in questions_for(sc, rng)
    ]
    sampled: list[list[str]] = [[] for _ in items]
    if recipe.rejected == "self":
        torch.manual_seed(recipe.seed)
        ims = [sc.render() for sc, _ in items]
        qs = [qa.question for _, qa in items]
        for _ in range(recipe.samples):
            for i, a in enumerate(
                answer_questions(model, processor, ims, qs, do_sample=True, temperature=recipe.temperature)
            ):
                sampled[i].append(a)
    out = []
    for (sc, qa), answers in zip(items, sampled):
        wrong = Counter(a for a in answers if a and not check_answer(qa.question, a, sc))
        rejected = wrong.most_common(1)[0][0] if wrong else wrong_answer(qa, sc, rng)
        out.append((sc, qa, qa.answer, rejected, "policy" if wrong else "perturbed"))
    return out


def write_pairs(out_dir: str | Path, pairs: list[tuple[Scene, QA, str, str, str]]) -> Path:
    """pairs.jsonl (image paths relative to it) + images/*.png in `out_dir`."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows, seen = [], set()
    for sc, qa, chosen, rejected, source in pairs:
        name = f"images/{hashlib.sha1(f'{sc.caption}|{sc.seed}'.encode()).hexdigest()[:16]}.png"
        if name not in seen:
            sc.render().save(out / name)
            seen.add(name)
        rows.append(
            {
                "image": name,
                "prompt": qa.question,
                "chosen": chosen,
                "rejected": rejected,
                "qtype": qa.qtype,
                "rejected_from": source,
                "caption": sc.caption,
                "seed": sc.seed,
            }
        )
    path = out / "pairs.jsonl"
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)
    return path


def materialize(spec: str, model_dir: str | Path | None = None, cache: str | Path | None = None) -> Path:
    """`toy:vlm_pairs` / `toy:vlm_pairs_perturbed` -> the path of a cached pairs.jsonl (built on first use)."""
    if spec not in SPECS:
        raise ValueError(f"data.path: unknown toy data {spec!r}; choose from {sorted(SPECS)}")
    recipe = SPECS[spec]
    model_dir = Path(model_dir or ASSETS / "vlm_toy")
    weights = model_dir / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: the toy VLM is missing (python -m mmalign.toy.train vlm)")
    h = hashlib.sha256(json.dumps([VERSION, recipe.__dict__]).encode())
    h.update(weights.read_bytes())
    root = Path(cache or os.environ.get("MMALIGN_CACHE", Path.home() / ".cache" / "mmalign"))
    out = root / "toy_vlm_pairs" / f"{spec.split(':', 1)[1]}-{h.hexdigest()[:12]}"
    if (out / "pairs.jsonl").is_file():
        return out / "pairs.jsonl"
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(model_dir)
    processor = AutoProcessor.from_pretrained(model_dir)
    return write_pairs(out, build_pairs(model, processor, recipe))
