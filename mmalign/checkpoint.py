"""Atomic checkpoints: write into a temporary sibling directory, then rename.

A checkpoint directory `step_000100/` either exists whole or not at all; a crash while
writing leaves only a `.tmp-*` directory, which is ignored and cleaned up later.
"""
from __future__ import annotations

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
    return sorted(done, key=lambda p: int(p.name[len(PREFIX):]))


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


def commit(tmp: Path, final: Path, state: dict[str, Any]) -> None:
    """Write state.json last, fsync, and rename tmp -> final (replacing an older one)."""
    (tmp / "state.json").write_text(json.dumps(state, indent=2))
    for f in tmp.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
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


def prune(root: Path, keep_last: int) -> None:
    cps = list_checkpoints(root)
    for p in cps[: max(0, len(cps) - keep_last)]:
        shutil.rmtree(p, ignore_errors=True)
    for p in root.glob(".tmp-*"):
        shutil.rmtree(p, ignore_errors=True)


def save_rng(directory: Path, rank: int) -> None:
    """This process's RNG states: python/numpy as JSON, torch as safetensors (no pickle)."""
    from safetensors.torch import save_file

    py = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    (directory / f"rng_{rank}.json").write_text(json.dumps({
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }))
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
