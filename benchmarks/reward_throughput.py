"""Reward adapter throughput: samples/s at batch 1 / 8 / 32 versus a per-sample loop.

Tiny mode (the default; CPU): every adapter runs on its tiny random model
(rewards/fixtures.py, installed as mmalign.rewards.fixtures; sizes in docs/tiny_models.md), so the numbers measure
the adapters' overhead and batching, not the real models' cost. Prints a table and writes JSON.

    .venv/bin/python benchmarks/reward_throughput.py [--adapters clip_hf,hps,...] [--batches 1,8,32]
        [--threads 1] [--min-time 0.5] [--out benchmarks/results/reward_throughput.json]

Real mode (`--real`; meant for a GPU): the released ARCHITECTURES with RANDOM weights
(nothing is downloaded), written to a temp directory in the format each adapter loads and
then loaded through the adapter's normal code path (build_reward), one adapter at a time
(built, measured, freed before the next):

    hps           open_clip ViT-H-14 (create_model(..., pretrained=None)); its state_dict saved
                  as {"state_dict": ...}, like HPS_v2(.1)_compressed.pt
    pickscore     transformers CLIPModel at CLIP-H/14 sizes (laion/CLIP-ViT-H-14-laion2B-s32B-b79K,
                  = yuvalkirstain/PickScore_v1: vision 1280 wide / 32 layers / 16 heads / MLP 5120 /
                  patch 14 / 224 px; text 1024 / 24 / 16 / 4096; GELU; projection 1024),
                  save_pretrained + CLIPTokenizer (open_clip's BPE, 49408 tokens) + CLIPImageProcessor
                  (224, CLIP mean / std)
    aesthetic     transformers CLIPModel at openai/clip-vit-large-patch14 sizes (vision 1024 / 24 /
                  16 / 4096, text 768 / 12 / 12 / 3072, quick-GELU, projection 768) + a random
                  AestheticMLP(768) head file (sac+logos+ava1-l14-linearMSE.pth layout)
    image_reward  the adapter's built-in ImageReward v1.0 BLIP (ViT-L/16 224 px + BERT-base with
                  cross-attention, vocab 30524), saved with the released ImageReward.pt keys

Images are 224 x 224 (`--image-size`), created on `--device`, so no host-to-device copy is
timed; prompts are short captions. "batched" is one adapter call on the whole batch (the
adapter's `batch_size` is set to the largest batch, so it is one forward pass); "loop" is the
same adapter called once per image with batch 1, as the original packages score (one
image/prompt per call). On CUDA every measurement synchronises, and the table adds the peak
allocated memory of the batched call (torch.cuda.max_memory_allocated, weights included;
"-" on CPU). `--dtype bfloat16` loads every adapter's model in bf16 (all four support it;
pixels and scores stay float32). The JSON records the device name, dtype, torch /
transformers / open_clip versions and each adapter's parameter count.

    # on a GPU (about 4 GB of fp32 weights per CLIP-H model; checkpoints go to a temp dir,
    # --workdir to choose where):
    .venv/bin/python benchmarks/reward_throughput.py --real --device cuda --dtype bfloat16
    .venv/bin/python benchmarks/reward_throughput.py --real --device cuda \
        --out benchmarks/results/reward_throughput_real_fp32.json
    # CPU smoke run (about 5 minutes on one thread; peak RSS about 11 GB, while ViT-H-14 loads):
    .venv/bin/python benchmarks/reward_throughput.py --real --device cpu --batches 1,2 --min-time 0.1
    # the same harness at the tiny sizes (seconds; checks the builders and dtypes):
    .venv/bin/python benchmarks/reward_throughput.py --real --arch tiny --dtype bfloat16

Real-mode options: --adapters (from hps, pickscore, aesthetic, image_reward), --batches,
--device cpu|cuda, --dtype float32|bfloat16, --arch full|tiny, --image-size, --warmup,
--min-time, --threads (default 1 on CPU, torch's default on CUDA), --workdir, --out
(default benchmarks/results/reward_throughput_real.json).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from mmalign.rewards import fixtures as fx  # noqa: E402
from mmalign.rewards.common import build_reward  # noqa: E402
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
    "pickscore": (
        lambda: {"name": "pickscore", **fx.tiny("clip_hf"), "processor": fx.tiny("clip_hf")["model"]},
        _images,
    ),
    "aesthetic": (lambda: {"name": "aesthetic", **fx.tiny("aesthetic")}, _images),
    "image_reward": (lambda: {"name": "image_reward", **fx.tiny("image_reward")}, _images),
    "jpeg_compressibility": (lambda: {"name": "jpeg_compressibility"}, _images),
    "vlm_judge/llava": (lambda: {"name": "vlm_judge", "batch_size": 32, **fx.tiny("llava")}, _images),
    "vlm_judge/qwen2vl": (lambda: {"name": "vlm_judge", "batch_size": 32, **fx.tiny("qwen2vl")}, _images),
    "clap": (lambda: {"name": "clap", **fx.tiny("clap")}, _audio),
    "audiobox_aesthetics": (lambda: {"name": "audiobox_aesthetics", **fx.tiny("audiobox")}, _audio),
    "audio_judge/qwen2audio": (lambda: {"name": "audio_judge", "batch_size": 32, **fx.tiny("qwen2audio")}, _audio),
    "video_from_image/hps": (
        lambda: {"name": "video_from_image", "segments": 4, "image_reward": {"name": "hps", **fx.tiny("hps")}},
        _video,
    ),
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
        singles = [
            (Samples(**{k: (v[i : i + 1] if torch.is_tensor(v) else v) for k, v in vars(samples).items()}), [p])
            for i, p in enumerate(prompts)
        ]
        with torch.no_grad():
            batched = _rate(lambda: reward(samples, prompts), b, min_time)
            looped = _rate(lambda: [reward(s, p) for s, p in singles], b, min_time)
        rows.append(
            {
                "adapter": name,
                "batch": b,
                "batched_samples_per_s": batched,
                "loop_samples_per_s": looped,
                "speedup": batched / looped,
            }
        )
        print(
            f"  {name:24s} batch {b:3d}: {batched:9.1f} samples/s batched, {looped:9.1f} per-sample loop "
            f"(x{batched / looped:.2f})",
            file=sys.stderr,
        )
    return rows


# --------------------------------------------------------------------------- real mode: architectures

# laion/CLIP-ViT-H-14-laion2B-s32B-b79K (the PickScore_v1 backbone and processor) in transformers'
# CLIPConfig terms; the same sizes as open_clip's ViT-H-14 config (embed_dim 1024, vision width
# 1280 / 32 layers / head_width 80, text width 1024 / 24 layers / 16 heads), with nn.GELU.
CLIP_H14 = {
    "text_config": dict(
        vocab_size=49408,
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        max_position_embeddings=77,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        bos_token_id=49406,
        eos_token_id=49407,
    ),
    "vision_config": dict(
        image_size=224,
        patch_size=14,
        hidden_size=1280,
        intermediate_size=5120,
        num_hidden_layers=32,
        num_attention_heads=16,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
    ),
    "projection_dim": 1024,
}
# openai/clip-vit-large-patch14 (the LAION aesthetic predictor's backbone), quick-GELU.
CLIP_L14 = {
    "text_config": dict(
        vocab_size=49408,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        bos_token_id=49406,
        eos_token_id=49407,
    ),
    "vision_config": dict(
        image_size=224,
        patch_size=14,
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    ),
    "projection_dim": 768,
}
# --arch tiny: the same builders at the docs/tiny_models.md sizes (checks the harness in seconds).
CLIP_TINY = {"text_config": dict(fx.TINY_CLIP_TEXT), "vision_config": dict(fx.TINY_CLIP_VISION), "projection_dim": 16}

REAL_ADAPTERS = ("hps", "pickscore", "aesthetic", "image_reward")
# adapters whose dtype option loads the model in bfloat16 (pixels and scores stay float32)
REAL_BF16 = frozenset(REAL_ADAPTERS)


def _save_hf_clip(directory: Path, arch: dict) -> str:
    """Random transformers CLIPModel + CLIPTokenizer (open_clip BPE) + CLIPImageProcessor in `directory`."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    model = CLIPModel(
        CLIPConfig(
            text_config=dict(arch["text_config"]),
            vision_config=dict(arch["vision_config"]),
            projection_dim=arch["projection_dim"],
        )
    )
    model.save_pretrained(directory)
    del model
    gc.collect()
    fx.clip_tokenizer(directory).save_pretrained(directory)
    s = int(arch["vision_config"]["image_size"])
    CLIPImageProcessor(size={"shortest_edge": s}, crop_size={"height": s, "width": s}).save_pretrained(directory)
    return str(directory)


def build_real_hps(directory: Path, arch: str = "full") -> dict:
    """open_clip ViT-H-14 with open_clip's random init, saved like HPS_v2(.1)_compressed.pt."""
    from mmalign.rewards.hps import build_open_clip

    model_config = None if arch == "full" else dict(fx.TINY_OPEN_CLIP)
    model, _ = build_open_clip("ViT-H-14", model_config)  # = open_clip.create_model("ViT-H-14", pretrained=None)
    path = directory / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": model.state_dict()}, path)
    del model
    spec = {"checkpoint": str(path), "architecture": "ViT-H-14"}
    if model_config is not None:
        spec["model_config"] = model_config
    return spec


def build_real_pickscore(directory: Path, arch: str = "full") -> dict:
    """A random CLIP-H/14 CLIPModel directory (model, tokenizer, processor), as PickScore_v1 loads."""
    path = _save_hf_clip(directory / "PickScore_v1", CLIP_H14 if arch == "full" else CLIP_TINY)
    return {"model": path, "processor": path}


def build_real_aesthetic(directory: Path, arch: str = "full") -> dict:
    """A random CLIP ViT-L/14 directory plus a random AestheticMLP head file."""
    from mmalign.rewards.aesthetic import AestheticMLP

    clip_arch = CLIP_L14 if arch == "full" else CLIP_TINY
    clip_dir = _save_hf_clip(directory / "clip-vit-large-patch14", clip_arch)
    path = directory / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save(AestheticMLP(clip_arch["projection_dim"]).state_dict(), path)
    return {"clip_model": clip_dir, "head": str(path)}


def build_real_image_reward(directory: Path, arch: str = "full") -> dict:
    """ImageReward v1.0 (the adapter's built-in BLIP config) with random init, saved with the
    released ImageReward.pt key names (plus the unused ITC projections and position_ids)."""
    from mmalign.rewards.image_reward import ImageRewardModel, image_reward_v1_config, to_original_state_dict

    spec: dict = {}
    if arch == "full":
        cfg = image_reward_v1_config()  # what the adapter builds when blip_config is None
    else:
        cfg = fx.tiny_image_reward_blip_config()
        cfg.save_pretrained(directory / "blip")
        spec["blip_config"] = str(directory / "blip")
    model = ImageRewardModel(cfg)
    sd = to_original_state_dict(model.state_dict())
    del model
    vw, tw, embed = cfg.vision_config.hidden_size, cfg.text_config.hidden_size, 256  # BLIP's ITC embed_dim
    sd.update(
        {
            "blip.vision_proj.weight": torch.randn(embed, vw) * 0.02,
            "blip.vision_proj.bias": torch.zeros(embed),
            "blip.text_proj.weight": torch.randn(embed, tw) * 0.02,
            "blip.text_proj.bias": torch.zeros(embed),
        }
    )
    sd.setdefault(
        "blip.text_encoder.embeddings.position_ids", torch.arange(cfg.text_config.max_position_embeddings)[None]
    )
    path = directory / "ImageReward.pt"
    torch.save(sd, path)
    del sd
    # a small uncased WordPiece vocabulary: prompts pad to max_length (35) anyway, so the
    # sequence length, and hence the cost, is the released tokenizer's
    spec.update(checkpoint=str(path), tokenizer=fx.write_bert_tokenizer(directory / "tokenizer"))
    return spec


REAL_BUILDERS = {
    "hps": build_real_hps,
    "pickscore": build_real_pickscore,
    "aesthetic": build_real_aesthetic,
    "image_reward": build_real_image_reward,
}


def real_spec(
    name: str,
    directory: str | Path,
    arch: str = "full",
    dtype: str = "float32",
    device: str | None = None,
    batch_size: int = 32,
) -> dict:
    """Build adapter `name`'s model files (random weights) under `directory`; return its reward spec."""
    if name not in REAL_BUILDERS:
        raise ValueError(f"real mode: unknown adapter {name!r}; known: {', '.join(REAL_ADAPTERS)}")
    if arch not in ("full", "tiny"):
        raise ValueError(f"arch: {arch!r} is not 'full' or 'tiny'")
    if dtype == "bfloat16" and name not in REAL_BF16:
        raise ValueError(f"{name}: no bfloat16 support in the adapter")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    spec = {"name": name, **REAL_BUILDERS[name](directory, arch), "dtype": dtype, "batch_size": batch_size}
    if device:
        spec["device"] = device
    gc.collect()
    return spec


# --------------------------------------------------------------------------- real mode: timing


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _rate_sync(fn, n_samples: int, min_time: float, device: str, warmup: int = 1) -> float:
    """samples/s of fn() (scores n_samples), synchronising the device around every timed call."""
    for _ in range(warmup):
        fn()
    _sync(device)
    reps, t0 = 0, time.perf_counter()
    while True:
        fn()
        _sync(device)
        reps += 1
        dt = time.perf_counter() - t0
        if dt >= min_time:
            return reps * n_samples / dt


def _param_count(reward) -> tuple[int, str]:
    """Parameters of the reward's modules (model, CLIP, head) and the dtype of the largest one's."""
    seen, n, dtypes = set(), 0, {}
    mods = [v for v in vars(reward).values() if isinstance(v, torch.nn.Module)]
    clip = getattr(reward, "clip", None)
    if clip is not None:
        mods += [v for v in vars(clip).values() if isinstance(v, torch.nn.Module)]
    for m in mods:
        for p in m.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                n += p.numel()
                dt = str(p.dtype).removeprefix("torch.")
                dtypes[dt] = dtypes.get(dt, 0) + p.numel()
    return n, max(dtypes, key=dtypes.get) if dtypes else "-"


def _mib(nbytes: int) -> float:
    return nbytes / 2**20


def bench_real(name: str, batches: list[int], args, workdir: Path) -> list[dict]:
    """Build one adapter at its real size (random weights), measure, free it."""
    device, cuda = args.device, args.device.startswith("cuda")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"mmalign-real-{name.replace('/', '_')}-", dir=workdir) as tmp:
        spec = real_spec(name, tmp, args.arch, args.dtype, device, batch_size=max(batches))
        build_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        reward = build_reward(spec, name)
        load_s = time.perf_counter() - t1
    # checkpoint files are deleted here; the loaded model lives on
    n_params, model_dtype = _param_count(reward)
    model_mib = _mib(torch.cuda.memory_allocated()) if cuda else None
    print(
        f"  {name}: {n_params / 1e6:.1f} M parameters ({model_dtype}), built + saved in {build_s:.1f} s, "
        f"loaded through the adapter in {load_s:.1f} s" + (f", {model_mib:.0f} MiB on the GPU" if cuda else ""),
        file=sys.stderr,
    )
    rows = []
    for b in batches:
        g = torch.Generator().manual_seed(b)
        images = torch.rand(b, 3, args.image_size, args.image_size, generator=g).to(device)
        samples = Samples(images=images)
        prompts = [f"a photo of a red circle above a blue square, number {i}" for i in range(b)]
        singles = [(Samples(images=images[i : i + 1]), [p]) for i, p in enumerate(prompts)]
        with torch.no_grad():
            scores = reward(samples, prompts)
            finite = bool(torch.isfinite(scores).all())
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            batched = _rate_sync(lambda: reward(samples, prompts), b, args.min_time, device, args.warmup)
            peak_b = _mib(torch.cuda.max_memory_allocated()) if cuda else None
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            looped = _rate_sync(lambda: [reward(s, p) for s, p in singles], b, args.min_time, device, args.warmup)
            peak_l = _mib(torch.cuda.max_memory_allocated()) if cuda else None
        rows.append(
            {
                "adapter": name,
                "batch": b,
                "batched_samples_per_s": batched,
                "loop_samples_per_s": looped,
                "speedup": batched / looped,
                "peak_mem_batched_mib": peak_b,
                "peak_mem_loop_mib": peak_l,
                "model_mem_mib": model_mib,
                "params": n_params,
                "model_dtype": model_dtype,
                "adapter_batch_size": max(batches),
                "scores_finite": finite,
                "build_s": build_s,
                "load_s": load_s,
            }
        )
        mem = f", peak {peak_b:.0f} MiB" if cuda else ""
        print(
            f"  {name:24s} batch {b:3d}: {batched:9.2f} samples/s batched, {looped:9.2f} per-sample loop "
            f"(x{batched / looped:.2f}){mem}",
            file=sys.stderr,
        )
    reward = samples = singles = images = scores = None  # free the model before the next one loads
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return rows


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main_real(args, ap: argparse.ArgumentParser) -> int:
    names = [a.strip() for a in (args.adapters or ",".join(REAL_ADAPTERS)).split(",") if a.strip()]
    unknown = [n for n in names if n not in REAL_BUILDERS]
    if unknown:
        ap.error(f"--real: unknown adapters {unknown}; known: {', '.join(REAL_ADAPTERS)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device cuda: torch.cuda.is_available() is False")
    batches = [int(b) for b in args.batches.split(",")]
    workdir = Path(args.workdir) if args.workdir else None
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
    print(
        f"real mode: {', '.join(names)} | arch {args.arch} | {args.device} ({_device_name(args.device)}) | "
        f"{args.dtype} | {args.image_size} px | batches {batches}",
        file=sys.stderr,
    )
    rows, skipped = [], []
    for n in names:
        if args.dtype == "bfloat16" and n not in REAL_BF16:
            skipped.append(n)
            continue
        rows += bench_real(n, batches, args, workdir)
    cuda = args.device.startswith("cuda")
    header = f"{'adapter':14s} {'batch':>5s} {'batched/s':>11s} {'loop/s':>11s} {'speedup':>8s} {'peak MiB':>9s}"
    print(header)
    print("-" * len(header))
    for r in rows:
        peak = f"{r['peak_mem_batched_mib']:9.0f}" if r["peak_mem_batched_mib"] is not None else f"{'-':>9s}"
        print(
            f"{r['adapter']:14s} {r['batch']:5d} {r['batched_samples_per_s']:11.2f} {r['loop_samples_per_s']:11.2f} "
            f"{r['speedup']:8.2f} {peak}"
        )
    for n in skipped:
        print(f"{n:14s} skipped: no bfloat16 support")
    import open_clip
    import transformers

    meta = {
        "mode": "real",
        "arch": args.arch,
        "device": args.device,
        "device_name": _device_name(args.device),
        "dtype": args.dtype,
        "image_size": args.image_size,
        "torch": torch.__version__,
        "cuda": torch.version.cuda if cuda else None,
        "transformers": transformers.__version__,
        "open_clip": open_clip.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "min_time": args.min_time,
        "warmup": args.warmup,
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32 if cuda else None,
        "load_avg": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "skipped": skipped,
        "note": (
            "released architectures with random weights, loaded through the adapters; batched = one call "
            "on the batch (adapter batch_size = largest batch); loop = one call per image (batch 1); "
            "peak memory = torch.cuda.max_memory_allocated during the timed calls, weights included"
        ),
    }
    out = Path(args.out or "benchmarks/results/reward_throughput_real.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
    print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--adapters",
        default=None,
        help="comma-separated, from: " + ", ".join(ADAPTERS) + " (with --real: " + ", ".join(REAL_ADAPTERS) + ")",
    )
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (0: leave torch's default; default 1, "
        "or torch's default with --real --device cuda)",
    )
    ap.add_argument("--min-time", type=float, default=0.5, help="seconds per measurement")
    ap.add_argument(
        "--out",
        default=None,
        help="JSON path (default benchmarks/results/reward_throughput.json, "
        "with --real benchmarks/results/reward_throughput_real.json)",
    )
    real = ap.add_argument_group("real mode (released architectures, random weights)")
    real.add_argument("--real", action="store_true", help="benchmark the real-size architectures (see above)")
    real.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    real.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    real.add_argument(
        "--arch",
        default="full",
        choices=["full", "tiny"],
        help="full: the released sizes; tiny: the same builders at the tiny sizes (harness check)",
    )
    real.add_argument("--image-size", type=int, default=224)
    real.add_argument("--warmup", type=int, default=1, help="untimed calls before each measurement")
    real.add_argument("--workdir", default=None, help="where the temporary checkpoints go (default: the temp dir)")
    args = ap.parse_args(argv)
    if not args.real:
        for opt, default in (
            ("device", "cpu"),
            ("dtype", "float32"),
            ("arch", "full"),
            ("image_size", 224),
            ("warmup", 1),
            ("workdir", None),
        ):
            if getattr(args, opt) != default:
                ap.error(f"--{opt.replace('_', '-')} only applies with --real")
    threads = args.threads if args.threads is not None else (0 if args.real and args.device == "cuda" else 1)
    if threads:
        torch.set_num_threads(threads)
    if args.real:
        return main_real(args, ap)
    names = [a.strip() for a in (args.adapters or ",".join(ADAPTERS)).split(",") if a.strip()]
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
        print(
            f"{r['adapter']:24s} {r['batch']:5d} {r['batched_samples_per_s']:11.1f} {r['loop_samples_per_s']:11.1f} "
            f"{r['speedup']:8.2f}"
        )
    meta = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "load_avg": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "note": "tiny random models (docs/tiny_models.md); CPU; loop = one call per sample",
    }
    out = Path(args.out or "benchmarks/results/reward_throughput.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
