"""Atomic, verifiable checkpoints: write into a temporary sibling directory, then rename.

A checkpoint directory `step_000100/` either exists whole or not at all; a crash while
writing leaves only a `.tmp-*` directory, which is ignored and cleaned up later. Its
`state.json`, written last, carries a manifest of every other file's size and SHA-256, so a
checkpoint damaged after it was written (a truncated copy, a flipped byte) is detected on resume
(`verify`) and `latest_intact` falls back to the newest checkpoint that passes. Pruning renames a
checkpoint to `.trash-*` before deleting it, so an interrupted prune never leaves a half-deleted
checkpoint that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

PREFIX = "step_"


def step_dir(root: Path, step: int) -> Path:
    return root / f"{PREFIX}{step:07d}"


def list_checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / "state.json").is_file()]
    return sorted(done, key=lambda p: int(p.name[len(PREFIX) :]))


def latest_checkpoint(root: Path) -> Path | None:
    cps = list_checkpoints(root)
    return cps[-1] if cps else None


def tmp_dir_for(final: Path) -> Path:
    return final.parent / f".tmp-{final.name}"


def begin(final: Path) -> Path:
    tmp = tmp_dir_for(final)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _hash_and_sync(path: Path) -> dict[str, Any]:
    """The file's size and SHA-256, read once; the file is fsynced on the way."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
        os.fsync(fh.fileno())
    return {"bytes": path.stat().st_size, "sha256": h.hexdigest()}


def commit(tmp: Path, final: Path, state: dict[str, Any]) -> None:
    """Write state.json (with the manifest of the other files) last, fsync, and rename tmp -> final
    (replacing an older one)."""
    files = {f.relative_to(tmp).as_posix(): _hash_and_sync(f) for f in sorted(tmp.rglob("*")) if f.is_file()}
    with open(tmp / "state.json", "w") as fh:
        fh.write(json.dumps({**state, "files": files}, indent=2))
        fh.flush()
        os.fsync(fh.fileno())
    if final.exists():
        old = final.parent / f".old-{final.name}"
        if old.exists():
            shutil.rmtree(old)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    _fsync_dir(final.parent)


def verify(path: Path) -> str | None:
    """Why the checkpoint at `path` is not intact (one line), or None when every file in its manifest
    is present with the recorded size and SHA-256. A checkpoint written before manifests existed (no
    "files" in its state.json) is accepted as it is."""
    try:
        state = json.loads((path / "state.json").read_text())
    except FileNotFoundError:
        return "no state.json"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return f"state.json unreadable ({type(e).__name__}: {e})"
    if not isinstance(state, dict) or "step" not in state:
        return "state.json has no step"
    for rel, meta in (state.get("files") or {}).items():
        f = path / rel
        if not f.is_file():
            return f"{rel} is missing"
        if f.stat().st_size != meta["bytes"]:
            return f"{rel} has {f.stat().st_size} bytes, the manifest says {meta['bytes']}"
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        if h.hexdigest() != meta["sha256"]:
            return f"{rel} does not match its SHA-256 in the manifest"
    return None


def latest_intact(root: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest checkpoint under `root` that passes `verify`, and the newer ones skipped (path, why)."""
    skipped = []
    for p in reversed(list_checkpoints(root)):
        why = verify(p)
        if why is None:
            return p, skipped
        skipped.append((p, why))
    return None, skipped


def prune(root: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` (>= 1) checkpoints, and leftovers of interrupted writes
    and prunes. Each checkpoint is first renamed out of view (atomic), then deleted."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    cps = list_checkpoints(root)
    for p in cps[: max(0, len(cps) - keep_last)]:
        trash = root / f".trash-{p.name}"
        if trash.exists():
            shutil.rmtree(trash)
        p.rename(trash)
    _fsync_dir(root)
    for p in [*root.glob(".trash-*"), *root.glob(".tmp-*"), *root.glob(".old-*")]:
        shutil.rmtree(p, ignore_errors=True)


def save_rng(directory: Path, rank: int) -> None:
    """This process's RNG states: python/numpy as JSON, torch as safetensors (no pickle)."""
    from safetensors.torch import save_file

    py = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    (directory / f"rng_{rank}.json").write_text(
        json.dumps(
            {
                "python": [py[0], list(py[1]), py[2]],
                "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
            }
        )
    )
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda_{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    save_file(tensors, str(directory / f"rng_{rank}.safetensors"))


def load_rng(directory: Path, rank: int) -> None:
    from safetensors.torch import load_file

    js = directory / f"rng_{rank}.json"
    if not js.is_file():  # resumed with more processes than saved: keep the fresh seed
        return
    st = json.loads(js.read_text())
    random.setstate((st["python"][0], tuple(st["python"][1]), st["python"][2]))
    kind, keys, pos, has_gauss, cached = st["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    tensors = load_file(str(directory / f"rng_{rank}.safetensors"))
    torch.set_rng_state(tensors["torch"])
    if torch.cuda.is_available():
        cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda_"))]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
