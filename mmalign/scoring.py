"""Scoring media with any registered reward, and a judge's agreement with human labels
(the library behind `mmalign score` and `mmalign eval-judge`, mmalign/cli/):

    mmalign score --reward NAME [--reward-args k=v ...] [--config reward.yaml]
                  (--prompts prompts.txt | --prompt TEXT | --manifest m.jsonl) [--out scores.jsonl] PATHS...
    mmalign score --list
    mmalign score --reward fad|vendi ... PATHS     (a distribution reward: one value for the whole set,
                                                  and each file's contribution to it)
    mmalign eval-judge --reward NAME [--reward-args k=v ...] --pairs pairs.jsonl [--pairwise] [--out judged.jsonl]

Media (mmalign.media): images (png/jpg/...), videos (.mp4/.webm/.mov/.mkv through PyAV, an
animated .gif for a video reward, or a directory of frames) and audio (.wav/.flac/.ogg/.mp3
through soundfile; mono or stereo, --downmix for more channels). A file that is missing,
unreadable, of another modality than the reward's, or (audio) at a rate the reward cannot
resample from stops the run with one line naming it.

Reward arguments (`--reward-args k=v`, values parsed as YAML, and/or a YAML file holding a
reward section `{name: ..., k: v}` or a run config with a `reward:` section) are validated by
the registry entry's config dataclass, exactly as in a run config.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from mmalign import registry
from mmalign.config import ConfigError, one_line_yaml_error, parse_dataclass, read_utf8
from mmalign.data.preference import json_type, jsonl_rows
from mmalign.media import (
    AUDIO_SUFFIXES,
    IMAGE_SUFFIXES,
    MediaError,
    load_audio,
    load_image,
    load_video,
    media_kind,
    resample_problem,
)
from mmalign.protocols import DistributionReward
from mmalign.rewards.common import build_reward
from mmalign.types import Samples

# --------------------------------------------------------------------------- reward from CLI


def parse_reward_args(pairs: Sequence[str] | None) -> dict[str, Any]:
    """['k=v', ...] -> dict, values parsed as YAML (numbers, booleans, lists, mappings)."""
    out: dict[str, Any] = {}
    for item in pairs or []:
        if "=" not in item:
            raise ConfigError(f"--reward-args {item!r}: expected key=value")
        k, v = item.split("=", 1)
        k = k.strip()
        if not k:
            raise ConfigError(f"--reward-args {item!r}: empty key")
        try:
            out[k] = yaml.safe_load(v) if v.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"--reward-args {k}: not a YAML value ({e})") from None
        if out[k] is None and v.strip() not in ("null", "~", "None"):
            out[k] = v
    return out


def reward_spec(name: str | None, args: Sequence[str] | None = None, config: str | None = None) -> dict[str, Any]:
    """Merge --config (a reward section or a run config's `reward:`), --reward and --reward-args."""
    spec: dict[str, Any] = {}
    if config:
        p = Path(config)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found")
        try:
            data = yaml.safe_load(read_utf8(p, "config")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {one_line_yaml_error(e)}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: expected a mapping")
        spec = dict(data["reward"]) if isinstance(data.get("reward"), dict) else dict(data)
    if name:
        if spec.get("name") not in (None, name):
            spec = {}  # a different reward than the file's: the file's arguments do not apply
        spec["name"] = name
    spec.update(parse_reward_args(args))
    if "name" not in spec:
        raise ConfigError("give --reward NAME (or a --config with a reward name)")
    return spec


def build_reward_from_spec(spec: dict[str, Any], where: str = "reward") -> Any:
    """Validate the arguments with the entry's config dataclass, then build."""
    return build_reward(spec, where)


def validate_reward_spec(spec: dict[str, Any], where: str = "reward") -> Any:
    """The entry's validated config object (raises ConfigError naming the bad key)."""
    try:
        entry = registry.lookup("reward", spec["name"])
    except KeyError as e:
        raise ConfigError(f"{where}.name: {e.args[0]}") from None
    return parse_dataclass(entry.config, {k: v for k, v in spec.items() if k != "name"}, where)


# For entries whose builder carries no `reward_info` (rewards/common.py) attributes.
_KNOWN_INFO = {
    "clip": ("image", "config (default yes)", "open_clip model (name / local-dir: / hf-hub:) + weights"),
}


def build_scoring_reward(
    name: str | None, reward_args: Sequence[str] | None = None, config: str | None = None, device: str | None = None
) -> tuple[Any, dict]:
    """The reward a `--reward NAME --reward-args k=v --config FILE --device D` spec names, validated
    before any model loads; returns (reward, spec)."""
    spec = reward_spec(name, reward_args, config)
    if device:
        entry = registry.lookup("reward", spec["name"])
        if "device" in getattr(entry.config, "__dataclass_fields__", {}):
            spec.setdefault("device", device)
    validate_reward_spec(spec)  # clear error before any model loads
    return build_reward_from_spec(spec), spec


def list_rewards() -> list[dict[str, str]]:
    registry.load_builtins()
    registry.load_plugins()
    rows = []
    for name in sorted(registry.REWARDS):
        e = registry.REWARDS[name]
        known = _KNOWN_INFO.get(name, ("?", "?", "?"))
        diff = getattr(e.build, "differentiable", known[1])
        rows.append(
            {
                "name": name,
                "kind": "batch" if getattr(e.build, "batch_level", False) else "sample",
                "modality": str(getattr(e.build, "modality_label", None) or getattr(e.build, "modality", known[0])),
                "differentiable": {True: "yes", False: "no"}.get(diff, str(diff))
                if isinstance(diff, bool)
                else str(diff),
                "loads": str(getattr(e.build, "loads", known[2])),
                "description": e.doc,
            }
        )
    return rows


# --------------------------------------------------------------------------- inputs


def read_prompts_file(path: str) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: prompts file not found")
    return [line.rstrip("\n") for line in read_utf8(p, "prompts file").splitlines() if line.strip()]


def check_prompts(reward: Any, name: str, items: Sequence[tuple[str, str]]) -> None:
    """ValueError when a reward that scores media against a prompt (`uses_prompts`) would get an empty one."""
    empty = [path for path, prompt in items if not prompt.strip()]
    if getattr(reward, "uses_prompts", False) and empty:
        raise ValueError(
            f"--reward {name} scores media against a prompt, and {empty[0]} has none: give --prompt, "
            "--prompts or a --manifest with a prompt per row"
        )


def read_jsonl(path: str) -> list[dict]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: file not found")
    rows = jsonl_rows(p)
    for where, row in rows:
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected a JSON object per line")
    return [row for _, row in rows]


def _resolve(base: Path, value: str) -> str:
    q = Path(value)
    return str(q if q.is_absolute() else base / q)


MEDIA_KEYS = ("path", "file", "image", "video", "audio")


def media_items(
    paths: Sequence[str] | None = None,
    prompts: Sequence[str] | None = None,
    prompts_file: str | None = None,
    manifest: str | None = None,
) -> list[tuple[str, str]]:
    """(path, prompt) pairs from media paths + prompts (and/or a prompts file), or from a manifest."""
    if manifest:
        if paths:
            raise ValueError("give media PATHS or --manifest, not both")
        base = Path(manifest).parent
        items = []
        for i, row in enumerate(read_jsonl(manifest), 1):
            key = next((k for k in MEDIA_KEYS if k in row), None)
            if key is None:
                raise ValueError(f"{manifest}:{i}: no media key (one of {', '.join(MEDIA_KEYS)})")
            prompt = row.get("prompt", row.get("caption", ""))
            if not isinstance(prompt, str):
                raise ValueError(f"{manifest}:{i}: prompt: expected text, got {json_type(prompt)} ({prompt!r:.40})")
            items.append((_resolve(base, str(row[key])), prompt))
        if not items:
            raise ValueError(f"{manifest}: no rows")
        return items
    paths = list(paths or [])
    if not paths:
        raise ValueError("give media PATHS (or --manifest m.jsonl)")
    prompts = list(prompts or [])
    if prompts_file:
        prompts += read_prompts_file(prompts_file)
    if not prompts:
        prompts = [""]
    if len(prompts) == 1:
        prompts = prompts * len(paths)
    if len(prompts) != len(paths):
        raise ValueError(f"{len(paths)} media files but {len(prompts)} prompts (give one per file, or one for all)")
    return list(zip(paths, prompts))


def expand_folders(items: Sequence[tuple[str, str]], modality: str) -> list[tuple[str, str]]:
    """For an audio or image reward, a folder stands for its files of that modality (subfolders
    included, sorted by path), each with the folder's prompt; MediaError if it holds none. (For a
    video reward a folder is one video: its frames.)"""
    suffixes = {"audio": AUDIO_SUFFIXES, "image": IMAGE_SUFFIXES}.get(modality)
    if suffixes is None:
        return list(items)
    out: list[tuple[str, str]] = []
    for path, prompt in items:
        p = Path(path)
        if not p.is_dir():
            out.append((path, prompt))
            continue
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in suffixes)
        if not files:
            raise MediaError(f"{p}: no {modality} files in this folder (looked for {', '.join(sorted(suffixes))})")
        out += [(str(f), prompt) for f in files]
    return out


def load_media(
    path: str, modality: str, num_frames: int | None = None, downmix: bool = False, reward: Any = None
) -> tuple[Any, int | None]:
    """One file -> (tensor, sample_rate or None) for the reward's modality, errors naming the file.

    Images: any Pillow format. Videos: MP4/WebM/MOV/MKV (PyAV), GIF (as a video when the reward
    scores video), or a folder of frames; `num_frames` keeps that many evenly spaced frames.
    Audio: WAV/FLAC/OGG/MP3 (soundfile), mono or stereo (`downmix` mixes more channels to mono);
    a rate that `reward` (its `sampling_rate`) cannot be resampled from is refused.
    """
    p = Path(path)
    if not p.exists():
        raise MediaError(f"{p}: file not found")
    kind = media_kind(p, prefer=modality)
    if modality in ("image", "video", "audio") and kind != modality:
        raise MediaError(f"{p}: is {kind}, but the reward scores {modality}; give {modality} files")
    if kind == "image":
        return load_image(p), None
    if kind == "video":
        return load_video(p, num_frames), None
    wave, sr = load_audio(p, downmix=downmix)
    target = getattr(reward, "sampling_rate", None)
    if target and getattr(reward, "resamples", True):
        why = resample_problem(sr, int(target))
        if why:
            raise MediaError(f"{p}: {why}")
    elif target and sr != int(target):
        raise MediaError(f"{p}: {sr} Hz, but the reward takes {int(target)} Hz audio only; resample it first")
    return wave, sr


def _samples(tensors: list, modality: str, sample_rate: int | None):
    x = torch.stack(tensors)
    if modality == "image":
        return Samples(images=x)
    if modality == "video":
        return Samples(video=x)
    return Samples(audio=x, sample_rate=sample_rate)


def score_items(
    reward: Any,
    items: Sequence[tuple[str, str]],
    batch_size: int = 8,
    num_frames: int | None = None,
    downmix: bool = False,
) -> list[float]:
    """Score (path, prompt) items, batching files of equal shape (and sample rate) together."""
    modality = reward.modality if reward.modality in ("image", "video", "audio") else None
    scores: list[float] = [math.nan] * len(items)
    pending: dict[tuple, list[tuple[int, Any, str]]] = defaultdict(list)

    def flush(key: tuple) -> None:
        group = pending.pop(key)
        kind, sr = key[0], key[1]
        with torch.no_grad():
            out = reward(_samples([t for _, t, _ in group], kind, sr), [p for _, _, p in group])
        for (i, _, _), s in zip(group, out.detach().float().cpu().tolist()):
            scores[i] = float(s)

    for i, (path, prompt) in enumerate(items):
        kind = modality or media_kind(path)
        tensor, sr = load_media(path, kind, num_frames, downmix, reward)
        key = (kind, sr, tuple(tensor.shape))
        pending[key].append((i, tensor, prompt))
        if len(pending[key]) >= batch_size:
            flush(key)
    for key in list(pending):
        flush(key)
    return scores


def is_batch_level(reward: Any) -> bool:
    """Whether `reward` is a distribution reward (scored over the whole set, `score_batch`)."""
    return isinstance(reward, DistributionReward)


def score_distribution(
    reward: Any,
    items: Sequence[tuple[str, str]],
    batch_size: int = 8,
    num_frames: int | None = None,
    downmix: bool = False,
) -> tuple[float, list[float]]:
    """A distribution reward over all (path, prompt) items as one set: (the set's value, each
    item's contribution, summing to it). A reward with `embed` / `score_embeddings` embeds files
    of equal shape `batch_size` at a time (files may differ in size and sample rate); otherwise
    every file must have one shape and `score_batch` sees them all at once."""
    modality = reward.modality if reward.modality in ("image", "video", "audio") else None
    prompts = [p for _, p in items]
    loaded = []
    for path, _ in items:
        kind = modality or media_kind(path)
        tensor, sr = load_media(path, kind, num_frames, downmix)
        loaded.append((kind, tensor, sr))
    with torch.no_grad():
        if hasattr(reward, "embed") and hasattr(reward, "score_embeddings"):
            groups: dict[tuple, list[int]] = defaultdict(list)
            for i, (kind, tensor, sr) in enumerate(loaded):
                groups[(kind, sr, tuple(tensor.shape))].append(i)
            rows: list[Any] = [None] * len(loaded)
            for (kind, sr, _), idx in groups.items():
                for j in range(0, len(idx), batch_size):
                    part = idx[j : j + batch_size]
                    emb = reward.embed(_samples([loaded[i][1] for i in part], kind, sr))
                    for i, e in zip(part, emb):
                        rows[i] = e
            value, contrib = reward.score_embeddings(torch.stack(rows), prompts)
        else:
            shapes = {(k, sr, tuple(t.shape)) for k, t, sr in loaded}
            if len(shapes) > 1:
                raise ValueError(
                    f"reward {getattr(reward, 'name', '?')!r} scores the files as one batch, "
                    f"and they differ in shape or sample rate ({len(shapes)} kinds)"
                )
            kind, _, sr = loaded[0]
            value, contrib = reward.score_batch(_samples([t for _, t, _ in loaded], kind, sr), prompts)
    return float(value), [float(c) for c in contrib.detach().cpu().tolist()]


def summarize(values: Iterable[float]) -> dict[str, float]:
    v = [x for x in values if x == x]
    if not v:
        return {"n": 0, "mean": math.nan, "std": math.nan, "min": math.nan, "max": math.nan}
    mean = sum(v) / len(v)
    std = math.sqrt(sum((x - mean) ** 2 for x in v) / len(v))
    return {"n": len(v), "mean": mean, "std": std, "min": min(v), "max": max(v)}


def format_table(rows: list[dict[str, Any]], columns: Sequence[str]) -> str:
    def fmt(x: Any) -> str:
        if isinstance(x, float):
            return f"{x:.4f}"
        return str(x)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[j]) for row in cells)) if cells else len(c) for j, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(x.ljust(w) for x, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


# --------------------------------------------------------------------------- eval-judge


def read_pairs(path: str) -> list[dict]:
    """Normalise pair rows to {prompt, chosen, rejected, category}; human ties are dropped (counted)."""
    base = Path(path).parent
    out = []
    for i, row in enumerate(read_jsonl(path), 1):
        prompt = row.get("prompt", row.get("caption"))
        if prompt is None:
            raise ValueError(f"{path}:{i}: no prompt (key 'prompt' or 'caption')")
        if "chosen" in row and "rejected" in row:
            chosen, rejected = row["chosen"], row["rejected"]
        elif "image0" in row and "image1" in row and "label" in row:
            label = row["label"]
            if label in (0, "0"):
                chosen, rejected = row["image0"], row["image1"]
            elif label in (1, "1"):
                chosen, rejected = row["image1"], row["image0"]
            else:  # a human tie carries no preference label
                out.append({"prompt": prompt, "human_tie": True, "category": row.get("category", "all")})
                continue
        else:
            raise ValueError(f"{path}:{i}: expected keys chosen/rejected (or image0/image1/label)")
        out.append(
            {
                "prompt": str(prompt),
                "chosen": _resolve(base, chosen),
                "rejected": _resolve(base, rejected),
                "category": str(row.get("category", "all")),
                "human_tie": False,
            }
        )
    return out


def agreement(margins: Sequence[float], tie_eps: float = 0.0) -> dict[str, float]:
    """MJ-Bench-style accuracy from per-pair margins (judge's chosen-minus-rejected preference).

    A pair is correct when margin > tie_eps, wrong when margin < -tie_eps, a tie otherwise.
    acc_with_ties counts ties as wrong (correct / all pairs); acc_without_ties drops them
    (correct / non-tied pairs).
    """
    n = len(margins)
    correct = sum(1 for m in margins if m > tie_eps)
    ties = sum(1 for m in margins if abs(m) <= tie_eps)
    decided = n - ties
    return {
        "n": n,
        "acc_with_ties": correct / n if n else math.nan,
        "acc_without_ties": correct / decided if decided else math.nan,
        "tie_rate": ties / n if n else math.nan,
    }


def both_orders_agreement(
    p_chosen_first: Sequence[float], p_rejected_first: Sequence[float], tie_eps: float = 0.0
) -> dict[str, float]:
    """Agreement and position bias of a pairwise judge shown every pair in both orders.

    p_chosen_first[i] / p_rejected_first[i] are the judge's P(the first-shown item is better)
    with pair i shown as (chosen, rejected) / (rejected, chosen). Each order is one decision,
    with chosen-minus-rejected margin P - 0.5 and 0.5 - P respectively; acc_with_ties,
    acc_without_ties and tie_rate are `agreement` over these 2n decisions (n = pairs).
    position_bias = the fraction of decided answers (|P - 0.5| > tie_eps), over both orders,
    that pick the first-shown item: 0.5 for a judge without position bias (a perfect judge
    picks first in exactly one of the two orders), 1.0 for one that always answers "first"
    (which then agrees half the time), 0.0 for one that always answers "second".
    """
    margins = [p - 0.5 for p in p_chosen_first] + [0.5 - p for p in p_rejected_first]
    out = {**agreement(margins, tie_eps), "n": len(p_chosen_first)}
    decided = [p - 0.5 for p in [*p_chosen_first, *p_rejected_first] if abs(p - 0.5) > tie_eps]
    out["position_bias"] = sum(1 for m in decided if m > 0) / len(decided) if decided else math.nan
    return out


def _judge_pair_both_orders(reward: Any, p: dict) -> dict:
    """One pair shown as (chosen, rejected) and as (rejected, chosen); the judge's `prefer_first`
    (one order, its swap_average not applied) where it has one, else `prefer`."""
    ask = getattr(reward, "prefer_first", None) or reward.prefer
    (tc, src) = load_media(p["chosen"], reward.modality, reward=reward)
    (tr, srr) = load_media(p["rejected"], reward.modality, reward=reward)
    c, r = _samples([tc], reward.modality, src), _samples([tr], reward.modality, srr)
    with torch.no_grad():
        p_cf, p_rf = float(ask(c, r, [p["prompt"]])[0]), float(ask(r, c, [p["prompt"]])[0])
    p_chosen = 0.5 * (p_cf + 1.0 - p_rf)  # both orders averaged: P(chosen is better)
    return {
        **p,
        "p_first_chosen_first": p_cf,
        "p_first_rejected_first": p_rf,
        "p_chosen": p_chosen,
        "margin": p_chosen - 0.5,
    }


def judge_pairs(reward: Any, pairs: Sequence[dict], batch_size: int = 8, pairwise: bool = False) -> list[dict]:
    """Per pair: the judge's scores (or, pairwise, P(first better) in both orders) and the margin."""
    usable = [p for p in pairs if not p["human_tie"]]
    if pairwise:
        if not hasattr(reward, "prefer"):
            raise ValueError(f"reward {getattr(reward, 'name', '?')!r} has no prefer(a, b); drop --pairwise")
        # the two media of a pair may differ in size: one pair per call
        return [_judge_pair_both_orders(reward, p) for p in usable]
    results = []
    items = [(p["chosen"], p["prompt"]) for p in usable] + [(p["rejected"], p["prompt"]) for p in usable]
    scores = score_items(reward, items, batch_size)
    n = len(usable)
    for k, p in enumerate(usable):
        results.append(
            {**p, "score_chosen": scores[k], "score_rejected": scores[n + k], "margin": scores[k] - scores[n + k]}
        )
    return results


def agreement_row(results: Sequence[dict], pairwise: bool, tie_eps: float) -> dict[str, float]:
    """Agreement of judged pairs (judge_pairs) with the human labels: scores or both-order answers."""
    if pairwise:
        return both_orders_agreement(
            [r["p_first_chosen_first"] for r in results], [r["p_first_rejected_first"] for r in results], tie_eps
        )
    return agreement([r["margin"] for r in results], tie_eps)
