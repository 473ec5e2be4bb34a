"""Wan LoRA training-step benchmark: frames/s and peak memory, with and without gradient checkpointing.

    python benchmarks/video_step.py                                   # tiny random Wan on this CPU
    python benchmarks/video_step.py --pretrained Wan-AI/Wan2.1-T2V-1.3B-Diffusers --device cuda \\
        --num-frames 33 --height 480 --width 832 --batch 1 --dtype bfloat16

A step is what the trainer does for a flow-matching objective (Flow-DPO's and RAFT's inner loss):
the `wan` generator's `denoise_error` on a batch of clean video latents (one transformer forward
over B x C x F_lat x h x w latents, text conditioning precomputed), backward into the LoRA
weights (autocast in --dtype on CUDA, as the trainer's mixed precision) and an AdamW update.
frames/s = batch x num_frames / seconds per step (median of --steps timed steps after a warm-up
step). Peak memory: torch.cuda.max_memory_allocated on CUDA; on CPU each row runs in its own
process and reports that process's RSS high-water mark (model and activations included).
Prints a table and writes JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def build(args):
    from mmalign.pipelines.common import LoraSettings
    from mmalign.pipelines.wan import WAN_LORA_TARGETS, WanGenerator, WanGeneratorConfig

    pretrained = args.pretrained
    if pretrained is None:
        from mmalign.testing import make_tiny_wan

        pretrained = str(make_tiny_wan(Path(tempfile.mkdtemp()) / "wan"))
    cfg = WanGeneratorConfig(
        pretrained=pretrained,
        num_frames=args.num_frames,
        height=args.height,
        width=args.width,
        dtype=args.dtype if args.device != "cpu" else "float32",
        max_sequence_length=args.max_sequence_length,
        lora=LoraSettings(rank=args.rank, alpha=args.rank, target_modules=list(WAN_LORA_TARGETS)),
    )
    return WanGenerator(cfg).to(args.device)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_row(args, ckpt: bool) -> dict:
    torch.manual_seed(0)
    gen = build(args)
    if ckpt:
        gen.enable_gradient_checkpointing()
    model = gen.trainable().train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    B, dev = args.batch, args.device
    cond = gen.encode_prompt(["a red fox running through fresh snow"] * B)
    x0 = torch.randn(B, *gen.latent_shape, device=dev)
    noise = torch.randn_like(x0)
    autocast = torch.autocast("cuda", dtype=getattr(torch, args.dtype)) if dev.startswith("cuda") else None

    def step(k: int) -> None:
        t = torch.randint(0, gen.num_train_timesteps, (B,), generator=torch.Generator().manual_seed(k)).to(dev)
        if autocast is not None:
            with autocast:
                loss = gen.denoise_error(x0, cond, t, noise).mean()
        else:
            loss = gen.denoise_error(x0, cond, t, noise).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(0)  # warm-up (allocator, kernels)
    sync(dev)
    if dev.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times = []
    for k in range(args.steps):
        t0 = time.perf_counter()
        step(k + 1)
        sync(dev)
        times.append(time.perf_counter() - t0)
    dt = statistics.median(times)
    mem = (
        torch.cuda.max_memory_allocated()
        if dev.startswith("cuda")
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    return {
        "gradient_checkpointing": ckpt,
        "batch": B,
        "num_frames": args.num_frames,
        "latent_shape": list(gen.latent_shape),
        "tokens": gen.latent_shape[1] * (gen.latent_shape[2] // 2) * (gen.latent_shape[3] // 2),
        "trainable_params": sum(p.numel() for p in params),
        "s_per_step": dt,
        "frames_per_s": B * args.num_frames / dt,
        "peak_mem_mb": mem / 2**20,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pretrained", default=None, help="WanPipeline hub id or directory (default: a tiny random Wan)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"], help="CUDA only")
    ap.add_argument("--num-frames", type=int, default=17)
    ap.add_argument("--height", type=int, default=64)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--rank", type=int, default=32, help="LoRA rank (alpha = rank)")
    ap.add_argument("--max-sequence-length", type=int, default=None)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per row (after one warm-up step)")
    ap.add_argument("--out", default="benchmarks/results/video_step.json")
    ap.add_argument("--row", choices=["plain", "ckpt"], help=argparse.SUPPRESS)  # one row, JSON on stdout
    args = ap.parse_args()
    if args.max_sequence_length is None and args.pretrained is None:
        args.max_sequence_length = 16  # the tiny tokenizer's prompts
    if args.row:
        print(json.dumps(run_row(args, args.row == "ckpt")))
        return
    rows = []
    for ckpt in (False, True):
        if args.device == "cpu":  # a fresh process per row: its RSS high-water mark is that row's
            cmd = [sys.executable, __file__, *sys.argv[1:], "--row", "ckpt" if ckpt else "plain"]
            res = subprocess.run(cmd, capture_output=True, text=True, check=True)
            r = json.loads(res.stdout.strip().splitlines()[-1])
        else:
            r = run_row(args, ckpt)
            torch.cuda.empty_cache()
        rows.append(r)
        print(
            f"checkpointing {'on ' if ckpt else 'off'}  {r['s_per_step']:8.3f} s/step  "
            f"{r['frames_per_s']:9.2f} frames/s  {r['peak_mem_mb']:9.0f} MB peak"
        )
    device = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else platform.processor()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {k: v for k, v in vars(args).items() if k not in ("out", "row")}
    meta["pretrained"] = args.pretrained or "mmalign.testing.make_tiny_wan"
    meta["torch_threads"] = torch.get_num_threads()
    out.write_text(json.dumps({"device": device or platform.machine(), "settings": meta, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
