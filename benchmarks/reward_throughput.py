"""Reward adapter throughput on CPU: samples/s at batch 1 / 8 / 32 versus a per-sample loop.

Every adapter runs on its tiny random model (mmalign/rewards/_fixtures.py, the configs of
shared/TINY_MODELS.md), so the numbers measure the adapters' overhead and batching, not the
real models' cost. Prints a table and writes JSON.

    .venv/bin/python benchmarks/reward_throughput.py [--adapters clip_hf,hps,...] [--batches 1,8,32]
        [--threads 1] [--min-time 0.5] [--out runs/bench/reward_throughput.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from mmalign.rewards import _fixtures as fx  # noqa: E402
from mmalign.rewards._common import build_reward  # noqa: E402
from mmalign.types import Samples  # noqa: E402


def _images(b: int, size: int = 48) -> Samples:
    return Samples(images=torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(b)))


def _audio(b: int, seconds: float = 1.0, sr: int = 16000) -> Samples:
    g = torch.Generator().manual_seed(b)
    return Samples(audio=0.3 * torch.randn(b, 1, int(sr * seconds), generator=g), sample_rate=sr)


def _video(b: int, frames: int = 8, size: int = 32) -> Samples:
    return Samples(video=torch.rand(b, frames, 3, size, size, generator=torch.Generator().manual_seed(b)))


ADAPTERS = {
    # name: (reward spec factory, samples factory)
    "clip_hf": (lambda: {"name": "clip_hf", **fx.tiny("clip_hf")}, _images),
    "hps": (lambda: {"name": "hps", **fx.tiny("hps")}, _images),
    "pickscore": (lambda: {"name": "pickscore", **fx.tiny("clip_hf")}, _images),
    "aesthetic": (lambda: {"name": "aesthetic", **fx.tiny("aesthetic")}, _images),
    "image_reward": (lambda: {"name": "image_reward", **fx.tiny("image_reward")}, _images),
    "jpeg_compressibility": (lambda: {"name": "jpeg_compressibility"}, _images),
    "vlm_judge/llava": (lambda: {"name": "vlm_judge", "batch_size": 32, **fx.tiny("llava")}, _images),
    "vlm_judge/qwen2vl": (lambda: {"name": "vlm_judge", "batch_size": 32, **fx.tiny("qwen2vl")}, _images),
    "clap": (lambda: {"name": "clap", **fx.tiny("clap")}, _audio),
    "audiobox_aesthetics": (lambda: {"name": "audiobox_aesthetics", **fx.tiny("audiobox")}, _audio),
    "audio_judge/qwen2audio": (lambda: {"name": "audio_judge", "batch_size": 32, **fx.tiny("qwen2audio")}, _audio),
    "video_from_image/hps": (lambda: {"name": "video_from_image", "segments": 4,
                                      "image_reward": {"name": "hps", **fx.tiny("hps")}}, _video),
}


def _rate(fn, n_samples: int, min_time: float) -> float:
    """samples/s of fn() (which scores n_samples), repeated for at least min_time seconds."""
    fn()  # warm-up
    reps, t0 = 0, time.perf_counter()
    while True:
        fn()
        reps += 1
        dt = time.perf_counter() - t0
        if dt >= min_time:
            return reps * n_samples / dt


def bench(name: str, batches: list[int], min_time: float) -> list[dict]:
    spec_fn, make = ADAPTERS[name]
    reward = build_reward(spec_fn(), name)
    rows = []
    for b in batches:
        samples = make(b)
        prompts = [f"a red circle number {i}" for i in range(b)]
        singles = [(Samples(**{k: (v[i : i + 1] if torch.is_tensor(v) else v) for k, v in vars(samples).items()}), [p])
                   for i, p in enumerate(prompts)]
        with torch.no_grad():
            batched = _rate(lambda: reward(samples, prompts), b, min_time)
            looped = _rate(lambda: [reward(s, p) for s, p in singles], b, min_time)
        rows.append({"adapter": name, "batch": b, "batched_samples_per_s": batched, "loop_samples_per_s": looped,
                     "speedup": batched / looped})
        print(f"  {name:24s} batch {b:3d}: {batched:9.1f} samples/s batched, {looped:9.1f} per-sample loop "
              f"(x{batched / looped:.2f})", file=sys.stderr)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapters", default=",".join(ADAPTERS), help="comma-separated, from: " + ", ".join(ADAPTERS))
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: leave torch's default)")
    ap.add_argument("--min-time", type=float, default=0.5, help="seconds per measurement")
    ap.add_argument("--out", default="runs/bench/reward_throughput.json")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [a.strip() for a in args.adapters.split(",") if a.strip()]
    unknown = [n for n in names if n not in ADAPTERS]
    if unknown:
        ap.error(f"unknown adapters {unknown}; known: {', '.join(ADAPTERS)}")
    fx.register_test_rewards()
    batches = [int(b) for b in args.batches.split(",")]
    rows = []
    for n in names:
        rows += bench(n, batches, args.min_time)
    header = f"{'adapter':24s} {'batch':>5s} {'batched/s':>11s} {'loop/s':>11s} {'speedup':>8s}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['adapter']:24s} {r['batch']:5d} {r['batched_samples_per_s']:11.1f} {r['loop_samples_per_s']:11.1f} "
              f"{r['speedup']:8.2f}")
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "platform": platform.platform(), "load_avg": os.getloadavg() if hasattr(os, "getloadavg") else None,
            "note": "tiny random models (shared/TINY_MODELS.md); CPU; loop = one call per sample"}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
