"""The toy VLM world: questions about rendered shape scenes, an exact answer checker, and
the hallucination rate (the fraction of wrong answers, per question type).

A scene is a caption of the shapes world (mmalign/toy/world.py) drawn with a seed; its
ground truth is the layout the renderer used. Question types:

    color      what color is the {shape}?     -> "red"        (only for a shape whose copies share one colour)
    count      how many {shape}s?             -> "zero" .. "three" (digits accepted)
    exist      is there a {color} {shape}?    -> "yes" / "no"
    describe   describe the image.            -> a caption of the toy grammar that is true of
                                                 the scene (the objects exactly; a relation, if
                                                 said, must hold in the layout)

The split is the world's caption split: held-out scenes are drawn from held-out captions,
so every held-out question is about a colour-shape-relation combination never trained on.

    from mmalign.toy.vlm_world import make_scene, questions_for, check_answer, hallucination_rate
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from mmalign.data.vlm import VLMEncoder, build_sequences

from .world import COLORS, SHAPES, heldout_captions, layout, parse, perturb_caption, render_objects, train_captions

QTYPES = ("color", "count", "exist", "describe")
COUNT_WORDS = ("zero", "one", "two", "three")
DESCRIBE = "describe the image."


@dataclass(frozen=True)
class Scene:
    caption: str
    seed: int
    objects: tuple[tuple[str, str, int, int, int], ...]  # (color, shape, x, y, size), as rendered

    def render(self) -> Image.Image:
        return render_objects(self.objects)


def make_scene(caption: str, seed: int) -> Scene:
    return Scene(caption, seed, tuple(layout(caption, seed)))


def split_scenes(split: str, n: int, seed: int = 0) -> list[Scene]:
    """`n` scenes of the `train` or `heldout` split, deterministic in (split, n, seed)."""
    caps = {"train": train_captions, "heldout": heldout_captions}
    if split not in caps:
        raise ValueError(f"split: expected 'train' or 'heldout', got {split!r}")
    pool = caps[split]()
    rng = random.Random(f"vlm-scenes|{split}|{seed}")
    return [make_scene(rng.choice(pool), rng.randrange(1_000_000)) for _ in range(n)]


# ---------------------------------------------------------------------------- questions


@dataclass(frozen=True)
class QA:
    qtype: str
    question: str
    answer: str  # the reference answer (for describe: the scene's caption)


def _plural(shape: str) -> str:
    return shape + "s"


def question_of(qtype: str, rng: random.Random, scene: Scene) -> QA | None:
    """One question of `qtype` about `scene` with its correct answer (None if it does not apply)."""
    objs = [(c, s) for c, s, *_ in scene.objects]
    if qtype == "color":
        ok = [s for s in SHAPES if len({c for c, s2 in objs if s2 == s}) == 1]
        if not ok:
            return None
        shape = rng.choice(ok)
        return QA("color", f"what color is the {shape}?", next(c for c, s in objs if s == shape))
    if qtype == "count":
        present = sorted({s for _, s in objs})
        shape = rng.choice(present) if rng.random() < 0.75 else rng.choice(SHAPES)
        return QA("count", f"how many {_plural(shape)}?", COUNT_WORDS[sum(s == shape for _, s in objs)])
    if qtype == "exist":
        if rng.random() < 0.5:
            c, s = rng.choice(objs)
        else:  # a near miss: one attribute of a present object changed
            c, s = rng.choice(objs)
            if rng.random() < 0.5:
                c = rng.choice([x for x in COLORS if x != c])
            else:
                s = rng.choice([x for x in SHAPES if x != s])
        return QA("exist", f"is there a {c} {s}?", "yes" if (c, s) in objs else "no")
    if qtype == "describe":
        return QA("describe", DESCRIBE, scene.caption)
    raise ValueError(f"unknown question type {qtype!r}; expected one of {QTYPES}")


def questions_for(scene: Scene, rng: random.Random, qtypes: Sequence[str] = QTYPES) -> list[QA]:
    """One question of each applicable type."""
    return [q for t in qtypes if (q := question_of(t, rng, scene)) is not None]


def eval_set(split: str = "heldout", n_scenes: int = 100, seed: int = 0) -> list[tuple[Scene, QA]]:
    """The fixed evaluation set: every applicable question type for each of `n_scenes` scenes."""
    rng = random.Random(f"vlm-eval|{split}|{seed}")
    return [(sc, q) for sc in split_scenes(split, n_scenes, seed) for q in questions_for(sc, rng)]


# ---------------------------------------------------------------------------- checker

_Q = [
    ("color", re.compile(r"^what colou?r is the (\w+)$")),
    ("count", re.compile(r"^how many (\w+)$")),
    ("exist", re.compile(r"^is there an? (\w+) (\w+)$")),
    ("describe", re.compile(r"^describe the image$")),
]


def normalize(text: str) -> str:
    """Lower case, punctuation removed, whitespace collapsed."""
    return " ".join(re.sub(r"[^a-z0-9 ]+", " ", text.lower()).split())


def question_type(question: str) -> str:
    q = normalize(question)
    for t, pat in _Q:
        if pat.match(q):
            return t
    raise ValueError(f"question {question!r} is not a toy VLM question")


def _relation_holds(a, b, relation: str) -> bool:
    (_, _, ax, ay, asz), (_, _, bx, by, _) = a, b
    return ax + asz <= bx if relation == "left" else ay + asz <= by


def _describe_ok(answer: str, scene: Scene) -> bool:
    try:
        p = parse(answer)
    except ValueError:
        return False
    truth = [(c, s) for c, s, *_ in scene.objects]
    if Counter(p.objects) != Counter(truth):
        return False
    if p.relation is None:
        return True
    # the two said objects are distinct (the grammar forbids a == b): find each one's box
    a = next(o for o in scene.objects if o[:2] == p.objects[0])
    b = next(o for o in scene.objects if o[:2] == p.objects[1])
    return _relation_holds(a, b, p.relation)


def check_answer(question: str, answer: str, scene: Scene) -> bool:
    """Is `answer` a correct answer to `question` about `scene` (exactly, after normalising)?"""
    t = question_type(question)
    q, a = normalize(question), normalize(answer)
    objs = [(c, s) for c, s, *_ in scene.objects]
    if t == "describe":
        return _describe_ok(a, scene)
    arg = _Q[[x for x, _ in _Q].index(t)][1].match(q).groups()
    if t == "color":
        shape = arg[0]
        colors = {c for c, s in objs if s == shape}
        return len(colors) == 1 and a == next(iter(colors))
    if t == "count":
        shape = arg[0][:-1] if arg[0].endswith("s") else arg[0]
        n = sum(s == shape for _, s in objs)
        return a in (COUNT_WORDS[n] if n < len(COUNT_WORDS) else "", str(n))
    c, s = arg  # exist
    return a == ("yes" if (c, s) in objs else "no")


def wrong_answer(qa: QA, scene: Scene, rng: random.Random) -> str:
    """A POVID-style hallucination: the correct answer with an attribute, count or object changed."""
    if qa.qtype == "color":
        return rng.choice([c for c in COLORS if c != qa.answer])
    if qa.qtype == "count":
        return rng.choice([w for w in COUNT_WORDS if w != qa.answer])
    if qa.qtype == "exist":
        return "no" if qa.answer == "yes" else "yes"
    for _ in range(20):
        cap = perturb_caption(scene.caption, rng)
        if cap is not None and not check_answer(qa.question, cap, scene):
            return cap
    # a caption with one object's colour changed is always wrong
    c, s = scene.objects[0][:2]
    return f"a {rng.choice([x for x in COLORS if x != c])} {s}"


def hallucination_rate(scenes: Sequence[Scene], questions: Sequence[str], answers: Sequence[str]) -> dict:
    """Fraction of wrong answers per question type and overall ({"overall", "color", ..., "n"})."""
    wrong: Counter = Counter()
    total: Counter = Counter()
    for sc, q, a in zip(scenes, questions, answers, strict=True):
        t = question_type(q)
        total[t] += 1
        wrong[t] += not check_answer(q, a, sc)
    out = {t: wrong[t] / total[t] for t in QTYPES if total[t]}
    out["overall"] = sum(wrong.values()) / max(1, sum(total.values()))
    out["n"] = sum(total.values())
    return out


# ---------------------------------------------------------------------------- answering


def answer_questions(
    model,
    processor,
    images: Sequence[Image.Image],
    questions: Sequence[str],
    batch_size: int = 64,
    max_new_tokens: int = 16,
    do_sample: bool = False,
    temperature: float = 1.0,
) -> list[str]:
    """Answers of an image-text-to-text model (greedy by default), through the same chat
    template and encoding the preference data uses (mmalign.data.vlm.VLMEncoder)."""
    enc = VLMEncoder(processor)
    tok = enc.tok
    eos = model.generation_config.eos_token_id
    was_training = model.training
    model.eval()
    out: list[str] = []
    with torch.no_grad():
        for i in range(0, len(questions), batch_size):
            ps = [
                enc.encode_prompt([im], q) for im, q in zip(images[i : i + batch_size], questions[i : i + batch_size])
            ]
            seqs = build_sequences(ps, [torch.zeros(0, dtype=torch.long)] * len(ps), enc.pad_id, "left")
            kw = dict(do_sample=do_sample, max_new_tokens=max_new_tokens, pad_token_id=enc.pad_id, eos_token_id=eos)
            if do_sample:
                kw["temperature"] = temperature
            gen = model.generate(
                input_ids=seqs["input_ids"], attention_mask=seqs["attention_mask"], **seqs["vision"], **kw
            )
            new = gen[:, seqs["input_ids"].shape[1] :]
            out += [t.strip() for t in tok.batch_decode(new, skip_special_tokens=True)]
    model.train(was_training)
    return out


def evaluate(model, processor, items: Sequence[tuple[Scene, QA]], batch_size: int = 64) -> dict:
    """Held-out hallucination rate of `model` on `items` (e.g. `eval_set("heldout")`), greedy answers."""
    scenes = [s for s, _ in items]
    qs = [q.question for _, q in items]
    answers = answer_questions(model, processor, [s.render() for s in scenes], qs, batch_size)
    return hallucination_rate(scenes, qs, answers)
