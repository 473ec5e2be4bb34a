"""Diffusion-DPO training-step benchmark: pairs/s, peak memory and model FLOP utilisation.

    python benchmarks/train_step.py                 # tiny model on this machine's CPU
    python benchmarks/train_step.py --model sd15    # SD 1.5 UNet architecture, random weights
                                                    # (published config; no download), on a GPU

One row per (fine-tuning mode, gradient checkpointing). A step is what the trainer does:
text encoding, one batched policy forward over winners and losers, one reference forward
without autograd (LoRA disabled, or the frozen copy), backward and an AdamW update.
FLOPs come from torch.utils.flop_counter over one step; MFU divides the achieved FLOP/s
by the device's *measured* peak (a large matmul in the benchmark's dtype).
Prints a table and writes JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import tempfile
import time
from pathlib import Path

import torch

SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768,
    attention_head_dim=8,
    norm_num_groups=32,
)
SD15_TEXT = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
)


def build_sd15_pipe(dtype):
    """SD 1.5's UNet and text encoder architectures with random weights (nothing downloaded)."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from mmalign.testing import _scheduler, tiny_vae, write_clip_tokenizer

    tok = CLIPTokenizer.from_pretrained(write_clip_tokenizer(Path(tempfile.mkdtemp()) / "tok"))
    return StableDiffusionPipeline(
        unet=UNet2DConditionModel(**SD15_UNET),
        vae=tiny_vae(),
        text_encoder=CLIPTextModel(CLIPTextConfig(**SD15_TEXT)),
        tokenizer=tok,
        scheduler=_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def measured_peak_flops(device, dtype, n=4096, iters=10) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    sync(device)
    t = time.perf_counter()
    for _ in range(iters):
        a @ b
    sync(device)
    return 2 * n**3 * iters / (time.perf_counter() - t)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench(model: str, finetune: str, ckpt: bool, batch: int, steps: int, device, dtype, peak) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    from mmalign.methods.diffusion_dpo import DiffusionDPO, DiffusionDPOConfig
    from mmalign.pipelines.sd import LatentDiffusionGenerator, LoraSettings, SDGeneratorConfig

    torch.manual_seed(0)
    if model == "sd15":
        cfg = SDGeneratorConfig(pretrained="(random sd15)", finetune=finetune, lora=LoraSettings(rank=8, alpha=8))
        gen = LatentDiffusionGenerator(cfg, pipe=build_sd15_pipe(dtype))
    else:
        path = Path(model)
        if not path.is_dir():
            from mmalign.testing import make_tiny_sd

            path = make_tiny_sd(Path(tempfile.mkdtemp()) / "sd")
        cfg = SDGeneratorConfig(pretrained=str(path), finetune=finetune, lora=LoraSettings(rank=8, alpha=8))
        gen = LatentDiffusionGenerator(cfg)
    gen.to(device)
    if finetune == "lora" and dtype != torch.float32:  # frozen base in the compute dtype, LoRA in fp32
        gen.unet.to(dtype)
        for p in gen.unet.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    if ckpt:
        gen.enable_gradient_checkpointing()
    gen.unet.train()
    params = [p for p in gen.trainable().parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    method = DiffusionDPO(DiffusionDPOConfig())
    h = gen.resolution // gen.vae_scale
    batch_data = {
        "prompts": ["a photo of an astronaut riding a horse"] * batch,
        "latents_w": torch.randn(batch, 4, h, h, device=device),
        "latents_l": torch.randn(batch, 4, h, h, device=device),
        "seeds": torch.arange(batch),
    }
    amp = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def step():
        with amp:
            loss, _ = method.loss(batch_data, gen)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up
    with FlopCounterMode(display=False) as fc:
        step()
    flops = fc.get_total_flops()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    dt = (time.perf_counter() - t) / steps
    mem = (
        torch.cuda.max_memory_allocated()
        if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    return {
        "model": model if model == "sd15" else "tiny",
        "finetune": finetune,
        "grad_ckpt": ckpt,
        "pairs": batch,
        "step_ms": dt * 1e3,
        "pairs_per_s": batch / dt,
        "peak_mem_mb": mem / 2**20,
        "gflop_per_step": flops / 1e9,
        "achieved_tflops": flops / dt / 1e12,
        "mfu": flops / dt / peak,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="tiny | sd15 | a diffusers directory (e.g. the toy model)")
    ap.add_argument("--batch", type=int, default=None, help="pairs per step (default 8 tiny, 4 sd15)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    ap.add_argument("--out", default="benchmarks/results/train_step.json")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    batch = args.batch or (4 if args.model == "sd15" else 8)
    peak = measured_peak_flops(device, dtype)
    dev_name = (
        torch.cuda.get_device_name()
        if device.type == "cuda"
        else f"{platform.processor() or 'cpu'} ({torch.get_num_threads()} threads)"
    )
    print(f"device: {dev_name}, dtype {dtype}, measured matmul peak {peak / 1e12:.3f} TFLOP/s")
    rows = []
    for finetune in ("lora", "full"):
        for ckpt in (False, True):
            r = bench(args.model, finetune, ckpt, batch, args.steps, device, dtype, peak)
            rows.append(r)
            print(
                f"  {finetune:5s} ckpt={str(ckpt):5s} {r['step_ms']:9.1f} ms/step {r['pairs_per_s']:8.2f} pairs/s "
                f"{r['peak_mem_mb']:9.0f} MB  {r['gflop_per_step']:9.2f} GFLOP  MFU {100 * r['mfu']:5.1f}%"
            )
    cols = [
        "model",
        "finetune",
        "grad_ckpt",
        "pairs",
        "step_ms",
        "pairs_per_s",
        "peak_mem_mb",
        "gflop_per_step",
        "achieved_tflops",
        "mfu",
    ]
    print("\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{r[c]:.3g}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": dev_name, "dtype": str(dtype), "peak_flops": peak, "rows": rows}, indent=2))
    print(f"\nwrote {out}  (CPU peak memory is the process RSS high-water mark, cumulative over rows)")


if __name__ == "__main__":
    main()
