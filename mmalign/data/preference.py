"""Offline preference data: (prompt, chosen image, rejected image) pairs.

Sources
- a manifest: JSONL or CSV with columns `prompt, chosen, rejected` (image paths relative
  to the manifest; an optional boolean `tie` column marks ties);
- the Pick-a-Pic v2 column shape (`caption, jpg_0, jpg_1, label_0`, images as bytes) read
  with `datasets` from a local parquet/arrow directory (label_0 = 1: jpg_0 preferred,
  0: jpg_1 preferred, 0.5: tie).

Ties are dropped and counted. Every image is decoded before training starts: a missing or
corrupt one stops the run with its path, or with `skip_bad` is skipped and counted.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from mmalign.config import ConfigError, read_utf8
from mmalign.media import MediaError, open_image, pil_to_tensor


class DataError(ValueError):
    pass


def read_text(path: str | Path) -> str:
    """The text of a data file; one that is not UTF-8 is a DataError naming the file, line and byte."""
    try:
        return read_utf8(path, "data file")
    except ConfigError as e:
        raise DataError(str(e)) from None


def jsonl_objects(path: Path) -> list[tuple[str, dict]]:
    """jsonl_rows, each row a JSON object (`{...}`); a list, number or string names its line."""
    rows = jsonl_rows(path)
    for where, row in rows:
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object ({{...}}), got {json_type(row)}")
    return rows


def json_type(value: Any) -> str:
    """`a list`, `a number`, ... for error messages about JSON values."""
    names = {list: "a list", dict: "an object", str: "a string", bool: "true/false", type(None): "null"}
    return names.get(type(value), "a number" if isinstance(value, (int, float)) else type(value).__name__)


def check_text(where: str, key: str, value: Any) -> str:
    """`value` when it is a non-empty string; else DataError `WHERE: KEY: expected text, got ...`."""
    if not isinstance(value, str):
        raise DataError(f"{where}: {key}: expected text, got {json_type(value)} ({value!r:.40})")
    if not value.strip():
        raise DataError(f"{where}: {key}: is empty")
    return value


def jsonl_rows(path: Path) -> list[tuple[str, Any]]:
    """(where, value) for each non-blank line of a JSONL file, where = 'path:line'; a line that
    is not valid JSON raises DataError naming it."""
    rows = []
    for i, line in enumerate(read_text(path).splitlines(), 1):
        if line.strip():
            try:
                rows.append((f"{path}:{i}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{i}: not valid JSON ({e.msg})") from None
    return rows


@dataclass
class Pair:
    prompt: str
    chosen: Any  # a path, or image bytes
    rejected: Any
    chosen_name: str
    rejected_name: str


@dataclass
class PairSet:
    pairs: list[Pair]
    ties_dropped: int = 0
    bad_skipped: int = 0
    source: str = ""


def read_manifest(path: str | Path) -> PairSet:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: preference manifest not found")
    root = path.parent
    if path.suffix == ".csv":
        rows = [(f"{path}: row {i}", row) for i, row in enumerate(csv.DictReader(io.StringIO(read_text(path))), 1)]
    elif path.suffix in (".jsonl", ".json"):
        rows = jsonl_objects(path)
    else:
        raise DataError(f"{path}: manifest must be .jsonl or .csv")
    pairs, ties = [], 0
    for where, row in rows:
        missing = [k for k in ("prompt", "chosen", "rejected") if row.get(k) is None or row.get(k) == ""]
        if missing:
            raise DataError(f"{where}: missing {', '.join(missing)}")
        for key in ("prompt", "chosen", "rejected"):
            check_text(where, key, row[key])
        tie = row.get("tie", False)
        if tie is True or str(tie).lower() in ("1", "true", "yes"):
            ties += 1
            continue
        c, r = root / row["chosen"], root / row["rejected"]
        pairs.append(Pair(row["prompt"], c, r, str(c), str(r)))
    return PairSet(pairs, ties_dropped=ties, source=str(path))


def read_pickapic(path: str | Path) -> PairSet:
    """Pick-a-Pic v2 rows from a local `save_to_disk` directory or parquet file(s)."""
    import datasets

    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: Pick-a-Pic data not found")
    if path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "state.json").is_file()):
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[next(iter(ds))]
    else:
        files = sorted(map(str, path.glob("**/*.parquet"))) if path.is_dir() else [str(path)]
        if not files:
            raise DataError(f"{path}: no parquet files")
        ds = datasets.load_dataset("parquet", data_files=files, split="train")
    need = {"caption", "jpg_0", "jpg_1", "label_0"}
    if not need <= set(ds.column_names):
        raise DataError(f"{path}: missing Pick-a-Pic columns {sorted(need - set(ds.column_names))}")
    pairs, ties = [], 0
    for i, row in enumerate(ds):
        label = float(row["label_0"])
        if label == 0.5:
            ties += 1
            continue
        a, b = (row["jpg_0"], row["jpg_1"]) if label == 1.0 else (row["jpg_1"], row["jpg_0"])
        a_id, b_id = ("jpg_0", "jpg_1") if label == 1.0 else ("jpg_1", "jpg_0")
        pairs.append(Pair(row["caption"], a, b, f"{path}[row {i}].{a_id}", f"{path}[row {i}].{b_id}"))
    return PairSet(pairs, ties_dropped=ties, source=str(path))


def check_batch_fits(n_pairs: int, batch_size: int, source: str) -> None:
    """DataError unless one global batch (`train.batch_size` x processes) fits in the data."""
    if batch_size > n_pairs:
        raise DataError(
            f"{source}: {n_pairs} usable pairs, fewer than one batch of train.batch_size x processes "
            f"= {batch_size}; lower train.batch_size or add data"
        )


def validate_pairs(ps: PairSet, skip_bad: bool) -> PairSet:
    """Decode every image once; stop on the first bad one, or skip and count them."""
    good, bad = [], []
    for p in ps.pairs:
        try:
            open_image(p.chosen, p.chosen_name)
            open_image(p.rejected, p.rejected_name)
            good.append(p)
        except MediaError as e:
            if not skip_bad:
                raise DataError(f"{e} (set data.skip_bad=true to skip and count bad pairs)") from None
            bad.append(str(e))
    if not good:
        raise DataError(f"{ps.source}: no usable preference pairs" + (f" ({len(bad)} bad)" if bad else ""))
    return PairSet(good, ps.ties_dropped, ps.bad_skipped + len(bad), ps.source)


def content_digest(src: Any) -> str:
    """SHA-256 of an image's bytes: a file path, raw bytes, or a `{"bytes": ...}` record (Pick-a-Pic)."""
    if isinstance(src, dict) and src.get("bytes") is not None:
        src = src["bytes"]
    if isinstance(src, (bytes, bytearray, memoryview)):
        return hashlib.sha256(src).hexdigest()
    h = hashlib.sha256()
    with open(src, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def resize_center_crop(im: Image.Image, size: int) -> Image.Image:
    w, h = im.size
    s = size / min(w, h)
    if s != 1:
        im = im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
    w, h = im.size
    left, top = (w - size) // 2, (h - size) // 2
    return im.crop((left, top, left + size, top + size))


class PreferenceDataset(Dataset):
    """Items: {prompt, chosen, rejected (3,H,W in [0,1])} or cached {latents_w, latents_l}."""

    def __init__(self, ps: PairSet, resolution: int, random_flip: bool = False, seed: int = 0):
        self.ps, self.resolution, self.random_flip, self.seed = ps, resolution, random_flip, seed
        self.latents: dict[str, torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.ps.pairs)

    def image(self, src, name) -> torch.Tensor:
        return pil_to_tensor(resize_center_crop(open_image(src, name), self.resolution))

    def __getitem__(self, i: int) -> dict:
        p = self.ps.pairs[i]
        if self.latents is not None:
            return {"prompt": p.prompt, "latents_w": self.latents["w"][i], "latents_l": self.latents["l"][i]}
        w, l = self.image(p.chosen, p.chosen_name), self.image(p.rejected, p.rejected_name)
        if self.random_flip and torch.rand(1, generator=torch.Generator().manual_seed(self.seed + i)) < 0.5:
            w, l = w.flip(-1), l.flip(-1)
        return {"prompt": p.prompt, "chosen": w, "rejected": l}

    def fingerprint(self, model_id: str) -> str:
        """The latent cache's key: the model and its VAE settings, the resolution, and each pair's
        prompt and the bytes of its two images (not their paths: images replaced under the same
        paths are encoded again)."""
        h = hashlib.sha256(f"{model_id}|{self.resolution}|{self.ps.source}".encode())
        for p in self.ps.pairs:
            h.update(f"{p.prompt}|{content_digest(p.chosen)}|{content_digest(p.rejected)}".encode())
        return h.hexdigest()[:16]

    @torch.no_grad()
    def cache_latents(self, generator, cache_dir: str | Path, is_main: bool = True, batch_size: int = 16) -> Path:
        """Encode every pair once with the generator's VAE; reuse the file when it matches."""
        from safetensors.torch import save_file

        latents = getattr(generator.cfg, "vae_latents", "mean")  # posterior draws or means: not interchangeable
        path = Path(cache_dir) / f"latents_{self.fingerprint(f'{generator.cfg.pretrained}|{latents}')}.safetensors"
        if is_main and not path.is_file():
            ws, ls = [], []
            for i in tqdm(range(0, len(self), batch_size), desc="caching latents", unit="batch", dynamic_ncols=True):
                items = [self[j] for j in range(i, min(i + batch_size, len(self)))]
                seeds = range(i, i + len(items))  # a pair's two images share their posterior draw
                ws.append(generator.encode_images(torch.stack([it["chosen"] for it in items]), seeds).cpu())
                ls.append(generator.encode_images(torch.stack([it["rejected"] for it in items]), seeds).cpu())
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            save_file({"w": torch.cat(ws).contiguous(), "l": torch.cat(ls).contiguous()}, str(tmp))
            tmp.replace(path)
        return path

    def use_latents(self, path: Path) -> None:
        from safetensors.torch import load_file

        self.latents = load_file(str(path))


def collate(items: list[dict]) -> dict:
    out: dict[str, Any] = {"prompts": [it["prompt"] for it in items]}
    for k in items[0]:
        if k != "prompt":
            out[k] = (
                torch.stack([it[k] for it in items])
                if isinstance(items[0][k], torch.Tensor)
                else [it[k] for it in items]
            )
    return out
