"""`mmalign sample`: images, videos or audio from prompts, with plain or reward-aware guidance (mmalign.guidance).

    mmalign sample --model PATH_OR_ID [--lora CKPT] --prompts FILE --out DIR
                   [--guidance {cfg,dynamic-cfg,reward,best-of-n,beam} | --guidance SCALE]
                   [--reward NAME[:WEIGHT] ...] [--reward-args [NAME.]KEY=VALUE ...]
                   [--num-frames N] [--fps FPS] [--duration SECONDS] [--audio-format {wav,flac}]

Writes DIR/samples.jsonl with one row per sample: prompt, seed, path, guidance, cfg_scale,
rewards {name: score} of the final sample, and for dynamic-cfg the chosen CFG schedule (one
scale per step), for best-of-n the candidates' scores, for reward guidance the per-step
guidance norms. The media, by the generator's modality:

- image: DIR/NNNN_KK.png (prompt NNNN, sample KK) and DIR/grid.png;
- video: DIR/NNNN_KK.mp4 (H.264, `mmalign.media.save_video`) and DIR/NNNN_KK.gif, and per prompt
  DIR/NNNN_grid.png (a row of frames per sample); rows add num_frames, fps and gif;
- audio: DIR/NNNN_KK.wav (16-bit PCM) or .flac (--audio-format flac) at the model's sample
  rate; rows add sample_rate and duration_s.

--num-frames / --duration set the generator config's frame count (`num_frames`) / length in
seconds (`duration`, `audio_length_in_s`, `audio_end_in_s` (= audio_start_in_s + duration) or
`seconds_total`, whichever it has); a generator without that setting refuses the flag. --fps is
the written rate (default: the generator's `fps`, else 8) and sets the config's `fps` where it has one.

--reward NAME[:WEIGHT]: a registered reward (`mmalign score --list`); WEIGHT is a number or
START..END (linear from the first step to the last; dynamic-cfg and reward guidance use
it). `--reward-args KEY=VALUE` configures the reward (values parsed as YAML; with several
rewards, prefix the reward's name: clip.model=toy:proxy_clip). `--guidance 7.5` (a number)
is the older spelling of `--guidance cfg --cfg-scale 7.5`; `--pretrained` / `--weights` are
aliases of `--model` / `--lora`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from mmalign.config import ConfigError, flag, read_utf8  # light: yaml and the registries

MODES = ("cfg", "dynamic-cfg", "reward", "best-of-n", "beam")


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the `sample` subcommand: model, prompt and output flags, then the guidance flags."""
    p = sub.add_parser(
        "sample",
        help="generate images, videos or audio from prompts (optionally with trained weights)",
        description="Generate images, videos or audio; --guidance cfg | dynamic-cfg | reward | best-of-n | beam "
        "(rewards by --reward NAME[:WEIGHT]). Writes PNGs + grid.png, MP4 + GIF + frame grids, or WAV/FLAC, "
        "and samples.jsonl; with "
        "--label-pairs, a D3PO round for human labelling instead.",
    )
    p.add_argument("--model", "--pretrained", dest="pretrained", help="hub id or local diffusers directory")
    p.add_argument("--config", help="take the generator from a run config instead")
    p.add_argument("--generator", default="sd", help="generator registry name (default: sd)")
    p.add_argument(
        "--lora",
        "--weights",
        dest="weights",
        help="trained weights: a run's final/ directory (LoRA or UNet) or its LoRA .safetensors",
    )
    p.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    p.add_argument("--prompts", help="a text file, one prompt per line (or toy:heldout / toy:train)")
    p.add_argument("--n", type=flag(int, ge=1), default=1, help="samples (images, videos, clips) per prompt")
    p.add_argument("--steps", type=flag(int, ge=1), default=30)
    p.add_argument(
        "--guidance",
        default=None,
        metavar="{cfg,dynamic-cfg,reward,best-of-n,beam}",
        help="guidance method (default cfg); a number N is short for `cfg --cfg-scale N`",
    )
    p.add_argument("--eta", type=flag(float, ge=0), default=0.0)
    p.add_argument("--seed", type=flag(int, ge=0), default=0)
    p.add_argument("--batch-size", type=flag(int, ge=1), default=8)
    p.add_argument("--device")
    p.add_argument("--out", default="samples", help="output directory")
    p.add_argument(
        "--label-pairs",
        action="store_true",
        help="write a round for human labelling (D3PO) instead: 2 trajectories per prompt (x --n) from one "
        "initial noise; OUT/buffer.safetensors + buffer.json, OUT/images/<sample id>.png and an "
        "OUT/pairs.jsonl template (needs --eta > 0)",
    )
    add_media_args(p)
    add_guidance_args(p)


# generator config fields that hold a sample's length in seconds, in the order they are looked for
DURATION_FIELDS = ("duration", "audio_length_in_s", "audio_end_in_s", "seconds_total")


def add_media_args(p: argparse.ArgumentParser) -> None:
    """The video and audio flags of `mmalign sample`."""
    p.add_argument(
        "--num-frames",
        type=flag(int, ge=1),
        default=None,
        help="video generators: frames per video (default: the generator's num_frames)",
    )
    p.add_argument(
        "--fps",
        type=flag(float, gt=0),
        default=None,
        help="video generators: frame rate of the written MP4/GIF (default: the generator's fps, else 8)",
    )
    p.add_argument(
        "--duration",
        type=flag(float, gt=0),
        default=None,
        help="audio generators: seconds per sample, where the generator's config has a length setting",
    )
    p.add_argument(
        "--audio-format",
        choices=("wav", "flac"),
        default="wav",
        help="audio generators: write 16-bit WAV (default) or FLAC",
    )


def media_overrides(args: argparse.Namespace, config_cls: type, name: str, base: Any = None) -> dict[str, Any]:
    """The generator config fields --num-frames / --fps / --duration set; ConfigError naming the flag
    when the generator has no such setting. An end time (`audio_end_in_s`) is set to the start
    (`audio_start_in_s` of `base`, the config being overridden, else its default) plus --duration."""
    import dataclasses

    fields = {f.name for f in dataclasses.fields(config_cls)}
    over: dict[str, Any] = {}
    if getattr(args, "num_frames", None) is not None:
        if "num_frames" not in fields:
            raise ConfigError(f"--num-frames: generator {name!r} has no num_frames setting (not a video generator)")
        over["num_frames"] = args.num_frames
    if getattr(args, "duration", None) is not None:
        key = next((k for k in DURATION_FIELDS if k in fields), None)
        if key is None:
            raise ConfigError(
                f"--duration: generator {name!r} has no length setting ({', '.join(DURATION_FIELDS)}); "
                "its samples have a fixed length"
            )
        over[key] = args.duration
        if key == "audio_end_in_s" and "audio_start_in_s" in fields:
            start_field = next(f for f in dataclasses.fields(config_cls) if f.name == "audio_start_in_s")
            start = getattr(base, "audio_start_in_s", start_field.default)
            over[key] = float(start or 0.0) + args.duration
    if getattr(args, "fps", None) is not None and "fps" in fields:
        f = next(f for f in dataclasses.fields(config_cls) if f.name == "fps")
        over["fps"] = int(round(args.fps)) if f.type in (int, "int") else args.fps
    return over


def with_overrides(cfg: Any, over: dict[str, Any], where: str = "generator") -> Any:
    """A copy of the (already validated) generator config `cfg` with the fields `over`, range-checked
    and validated again (ConfigError naming the key)."""
    import dataclasses

    from mmalign.config import check_range

    if not over:
        return cfg
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    for key, value in over.items():
        if "range" in fields[key].metadata:
            check_range(f"{where}.{key}", value, fields[key].metadata["range"])
    try:
        new = dataclasses.replace(cfg, **over)
        if hasattr(new, "validate"):
            new.validate()
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}.{e}") from None
    return new


def add_guidance_args(p: argparse.ArgumentParser) -> None:
    """The guidance flags of `mmalign sample`."""
    p.add_argument(
        "--cfg-scale",
        type=flag(float, ge=0),
        default=None,
        help="CFG scale for cfg / reward / best-of-n / beam (default 5.0)",
    )
    p.add_argument(
        "--reward",
        action="append",
        default=None,
        metavar="NAME[:WEIGHT]",
        help="a reward to guide with and/or score the outputs with (repeatable); WEIGHT: number or A..B",
    )
    p.add_argument(
        "--reward-args",
        action="append",
        default=None,
        metavar="[NAME.]KEY=VALUE",
        help="reward configuration, e.g. model=toy:proxy_clip (repeatable)",
    )
    p.add_argument(
        "--cfg-candidates",
        default="5,2,3.5,7.5",
        help="dynamic-cfg: candidate scales, comma-separated; the first wins ties (default 5,2,3.5,7.5)",
    )
    p.add_argument(
        "--normalize",
        choices=("zscore", "none"),
        default="zscore",
        help="dynamic-cfg: standardise each evaluator over the candidates before weighting",
    )
    p.add_argument("--best-of", type=flag(int, ge=1), default=4, help="best-of-n: samples drawn per image (default 4)")
    p.add_argument("--beam-width", type=flag(int, ge=1), default=1, help="beam: particles kept per prompt (default 1)")
    p.add_argument(
        "--beam-candidates", type=flag(int, ge=1), default=4, help="beam: children per particle and step (default 4)"
    )
    p.add_argument(
        "--no-grad-through-model",
        action="store_true",
        help="reward: hold the denoiser output fixed when differentiating (cheaper)",
    )
    p.add_argument("--max-grad-norm", type=flag(float, gt=0), help="reward: clip each sample's guidance gradient")


def parse_guidance(value: str | None, cfg_scale: float | None) -> tuple[str, float]:
    """'dynamic-cfg' -> (mode, scale); a number (the older `--guidance 7.5`) -> ('cfg', number)."""
    default = 5.0 if cfg_scale is None else cfg_scale
    if value is None:
        return "cfg", default
    try:
        scale = float(value)
    except ValueError:
        if value not in MODES:
            raise ConfigError(f"--guidance: expected one of {', '.join(MODES)} or a CFG scale, got {value!r}") from None
        return value, default
    if cfg_scale is not None and cfg_scale != scale:
        raise ConfigError(f"--guidance {value} and --cfg-scale {cfg_scale} disagree; give one")
    return "cfg", scale


def parse_reward_specs(rewards: list[str] | None, reward_args: list[str] | None) -> list[tuple[dict, Any]]:
    """--reward NAME[:WEIGHT] ... + --reward-args [NAME.]K=V ... -> [(spec, weight)], validated."""
    from mmalign import registry
    from mmalign.guidance.common import parse_weight
    from mmalign.scoring import parse_reward_args, validate_reward_spec

    specs: list[tuple[dict, Any]] = []
    for item in rewards or []:
        name, _, w = item.partition(":")
        if not name:
            raise ConfigError(f"--reward {item!r}: expected NAME or NAME:WEIGHT")
        try:
            weight = parse_weight(w, f"--reward {item}") if w else 1.0
        except ValueError as e:
            raise ConfigError(str(e)) from None
        specs.append(({"name": name}, weight))
    names = [s["name"] for s, _ in specs]
    for key, value in parse_reward_args(reward_args).items():
        prefix, dot, rest = key.partition(".")
        if dot and prefix in names:
            targets, key = [s for s, _ in specs if s["name"] == prefix], rest
        elif len(specs) == 1:
            targets = [specs[0][0]]
        elif not specs:
            raise ConfigError(f"--reward-args {key}: give --reward NAME first")
        else:
            raise ConfigError(
                f"--reward-args {key}: several rewards given ({', '.join(names)}); "
                f"prefix the key with the reward's name, e.g. {names[0]}.{key}"
            )
        for t in targets:
            t[key] = value
    for spec, _ in specs:
        try:
            registry.lookup("reward", spec["name"])
        except KeyError as e:
            raise ConfigError(f"--reward {spec['name']}: {e.args[0]}") from None
        validate_reward_spec(spec, f"--reward {spec['name']}")  # bad or missing key -> ConfigError naming it
    return specs


def build_rewards(specs: list[tuple[dict, Any]], modality: str, device: str) -> list:
    """Build each reward; refuse one whose modality is not the generator's, naming both. For an audio
    generator the rewards only score the outputs (objects with `fn` and `name`); image and video
    rewards are guidance evaluators (the guided samplers decode x̂_0 to the generator's media)."""
    from types import SimpleNamespace

    from mmalign import registry
    from mmalign.guidance.common import Evaluator, as_evaluators
    from mmalign.rewards.common import build_reward

    out = []
    for spec, weight in specs:
        name = spec["name"]
        declared = getattr(registry.lookup("reward", name).build, "modality", None)
        if declared is not None and declared != modality:
            raise ConfigError(
                f"--reward {name}: scores {declared} samples, but this generator makes {modality} samples"
            )
        reward = build_reward(spec, f"--reward {name}")
        if getattr(reward, "modality", modality) != modality:
            raise ConfigError(
                f"--reward {name}: scores {reward.modality} samples, but this generator makes {modality} samples"
            )
        if hasattr(reward, "to"):
            reward.to(device)
        if modality not in ("image", "video"):  # audio: the outputs are scored, not guided
            taken = [e.name for e in out]
            out.append(SimpleNamespace(fn=reward, name=name if name not in taken else f"{name}_{len(taken)}"))
            continue
        out.append(Evaluator(reward, weight, name=name))
    return out if modality not in ("image", "video") else as_evaluators(out)  # unique names


def validate_sample_args(args: argparse.Namespace) -> tuple[str, float, list[tuple[dict, Any]], list[float]]:
    """Check the guidance flags without loading anything: (mode, cfg scale, reward specs, candidates)."""
    mode, scale = parse_guidance(args.guidance, args.cfg_scale)
    specs = parse_reward_specs(args.reward, args.reward_args)
    if mode != "cfg" and not specs:
        raise ConfigError(f"--guidance {mode} needs at least one --reward NAME")
    try:
        cands = [float(s) for s in args.cfg_candidates.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--cfg-candidates: expected comma-separated numbers, got {args.cfg_candidates!r}") from None
    if mode == "dynamic-cfg" and not cands:
        raise ConfigError("--cfg-candidates: give at least one scale")
    for name, v in (
        ("--n", args.n),
        ("--steps", args.steps),
        ("--batch-size", args.batch_size),
        ("--best-of", args.best_of),
        ("--beam-width", args.beam_width),
        ("--beam-candidates", args.beam_candidates),
    ):
        if v < 1:
            raise ConfigError(f"{name}: must be >= 1, got {v}")
    return mode, scale, specs, cands


def run_sample(args: argparse.Namespace, gen: Any, prompts: list[str], device: str) -> int:
    """Sample every prompt x --n seeds with the chosen guidance; write images, grid and JSONL."""
    import torch

    from mmalign.guidance import beam_search_sample, best_of_n_sample, dynamic_cfg_sample, reward_guided_sample

    mode, scale, specs, cands = validate_sample_args(args)
    modality = getattr(gen, "modality", "image")
    if modality not in ("image", "video") and mode != "cfg":
        raise ConfigError(
            f"--guidance {mode}: the guided samplers work on image and video generators; this generator makes "
            f"{modality} (use --guidance cfg; --reward then scores the outputs)"
        )
    evaluators = build_rewards(specs, modality, device)
    if mode == "reward":
        for e in evaluators:
            if not getattr(e.fn, "differentiable", False):
                raise ConfigError(
                    f"--reward {e.name}: not differentiable; --guidance reward needs a differentiable "
                    "reward (e.g. clip)"
                )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    writer = MediaWriter(args, gen, out)
    rows = []
    total = len(prompts) * args.n
    for i in range(0, total, args.batch_size):
        chunk = [(j // args.n, j % args.n) for j in range(i, min(i + args.batch_size, total))]
        ps = [prompts[p] for p, _ in chunk]
        seeds = [args.seed + p * 1000 + k for p, k in chunk]
        kw = dict(num_steps=args.steps, seeds=seeds, eta=args.eta)
        extra_rows: list[dict] = [{} for _ in chunk]
        if mode == "cfg":
            ro = gen.rollout(ps, guidance_scale=scale, need_log_probs=False, **kw)
        elif mode == "dynamic-cfg":
            ro = dynamic_cfg_sample(gen, ps, evaluators, candidates=cands, normalize=args.normalize, **kw)
            for r, sched in zip(extra_rows, ro.extras["cfg_schedule"].tolist()):
                r["cfg_schedule"] = sched
        elif mode == "reward":
            ro = reward_guided_sample(
                gen,
                ps,
                evaluators,
                guidance_scale=scale,
                through_model=not args.no_grad_through_model,
                max_grad_norm=args.max_grad_norm,
                **kw,
            )
            for r, g in zip(extra_rows, ro.extras["guidance_norm"].tolist()):
                r["guidance_norm"] = [round(v, 6) for v in g]
        elif mode == "best-of-n":
            ro = best_of_n_sample(gen, ps, evaluators, n=args.best_of, guidance_scale=scale, **kw)
            for r, s, c in zip(extra_rows, ro.extras["seeds"].tolist(), ro.extras["candidate_scores"].tolist()):
                r.update(chosen_seed=s, candidate_scores=c)
        else:  # beam
            ro = beam_search_sample(
                gen,
                ps,
                evaluators,
                beam_width=args.beam_width,
                num_candidates=args.beam_candidates,
                guidance_scale=scale,
                **{**kw, "eta": args.eta if args.eta > 0 else 1.0},
            )
        scores = {}
        with torch.no_grad():
            for e in evaluators:
                scores[e.name] = e.fn(ro.samples, ps).float().cpu().tolist()
        for j, ((p, k), s) in enumerate(zip(chunk, seeds)):
            row = {**writer.write(ro.samples, j, p, k), "prompt": prompts[p], "seed": s, "guidance": mode}
            row["cfg_scale"] = None if mode == "dynamic-cfg" else scale
            row["rewards"] = {name: v[j] for name, v in scores.items()}
            row.update(extra_rows[j])
            rows.append(row)
    written = writer.finish()
    with open(out / "samples.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    means = {name: sum(r["rewards"][name] for r in rows) / len(rows) for name in rows[0]["rewards"]} if rows else {}
    print(
        f"wrote {written} and samples.jsonl to {out} (guidance {mode}"
        + "".join(f", mean {k} {v:.4f}" for k, v in means.items())
        + ")"
    )
    return 0


class MediaWriter:
    """Writes each sample of a rollout as the generator's modality asks (see the module docstring)."""

    def __init__(self, args: argparse.Namespace, gen: Any, out: Path):
        self.args, self.out = args, out
        self.modality = getattr(gen, "modality", "image")
        self.fps = args.fps or getattr(gen, "fps", None) or getattr(getattr(gen, "cfg", None), "fps", None) or 8.0
        self.images: list = []
        self.videos: dict[int, list] = {}  # prompt index -> its videos, for the per-prompt grid
        self.count = 0

    def write(self, samples: Any, j: int, p: int, k: int) -> dict[str, Any]:
        """Sample j of `samples` (prompt p, its k-th sample) -> its files; the JSONL row's media fields."""
        from mmalign.media import save_audio, save_gif, save_video, tensor_to_pil

        stem = self.out / f"{p:04d}_{k:02d}"
        self.count += 1
        kind = samples.modality
        if kind == "image":
            img = samples.images[j].float().cpu()
            tensor_to_pil(img).save(stem.with_suffix(".png"))
            self.images.append(img)
            return {"path": str(stem.with_suffix(".png"))}
        if kind == "video":
            video = samples.video[j].float().cpu()
            save_video(stem.with_suffix(".mp4"), video, self.fps)
            save_gif(stem.with_suffix(".gif"), video, self.fps)
            self.videos.setdefault(p, []).append(video)
            return {
                "path": str(stem.with_suffix(".mp4")),
                "gif": str(stem.with_suffix(".gif")),
                "num_frames": int(video.shape[0]),
                "fps": self.fps,
            }
        if kind == "audio":
            if samples.sample_rate is None:
                raise ValueError("the generator's audio samples have no sample_rate")
            path = stem.with_suffix("." + self.args.audio_format)
            audio = samples.audio[j].float().cpu()
            save_audio(path, audio, int(samples.sample_rate))
            return {
                "path": str(path),
                "sample_rate": int(samples.sample_rate),
                "duration_s": audio.shape[-1] / int(samples.sample_rate),
            }
        raise ValueError(f"mmalign sample writes image, video or audio samples, not {kind}")

    def finish(self) -> str:
        """Write the grids; a description of what was written."""
        import torch

        from mmalign.media import image_grid, video_grid

        if self.images:
            image_grid(torch.stack(self.images), nrow=self.args.n if self.args.n > 1 else 8).save(self.out / "grid.png")
            return f"{self.count} images, grid.png"
        if self.videos:
            shapes = {tuple(v.shape) for vs in self.videos.values() for v in vs}
            for p, vs in self.videos.items():
                if len(shapes) == 1:
                    video_grid(torch.stack(vs)).save(self.out / f"{p:04d}_grid.png")
                else:  # videos of different sizes: one grid per video
                    for k, v in enumerate(vs):
                        video_grid(v).save(self.out / f"{p:04d}_{k:02d}_grid.png")
            grids = len(self.videos)
            return f"{self.count} videos (MP4 + GIF, {self.fps:g} fps), {grids} frame grid{'s' if grids > 1 else ''}"
        return f"{self.count} {self.args.audio_format.upper()} files"


def check_output_dir(flag: str, path: str | None) -> None:
    """ConfigError when an output directory flag names an existing file."""
    if path and Path(path).exists() and not Path(path).is_dir():
        raise ConfigError(f"{flag} {path}: is a file; give a directory (it is created if missing)")


def _read_prompts(args: argparse.Namespace) -> list[str]:
    """--prompt (repeatable) + --prompts (a text file or a registered prompt set such as toy:heldout)."""
    from mmalign import sources
    from mmalign.data.generated import load_prompts

    prompts = list(args.prompt or [])
    if args.prompts and sources.is_spec(args.prompts) and not Path(args.prompts).is_file():  # a prompt set
        try:
            prompts += load_prompts(args.prompts)
        except ValueError as e:
            raise ConfigError(f"--prompts: {e}") from None
    elif args.prompts:
        p = Path(args.prompts)
        if not p.is_file():
            raise ConfigError(f"{p}: prompts file not found")
        prompts += [line.strip() for line in read_utf8(p, "prompts file").splitlines() if line.strip()]
    if any(not p.strip() for p in prompts):
        raise ConfigError("--prompt: a prompt is empty")
    if not prompts:
        raise ConfigError("give --prompt TEXT (repeatable) or --prompts FILE")
    return prompts


def run(args: argparse.Namespace) -> int:
    """Load the generator (and weights), then sample, or write a D3PO labelling round."""
    # deferred: torch and the model libraries load only when the command runs (a fast `mmalign --help`)
    import torch

    from mmalign import registry
    from mmalign.config import load_config, parse_dataclass
    from mmalign.methods.d3po import write_for_labelling

    prompts = _read_prompts(args)  # bad input fails before any model loads
    check_output_dir("--out", args.out)
    validate_sample_args(args)
    label_scale = _check_label_pairs(args) if args.label_pairs else None
    if args.config:
        cfg = load_config(args.config)
        name = cfg.generator.name
        gen_cfg = with_overrides(
            cfg.generator.args,
            media_overrides(args, type(cfg.generator.args), name, cfg.generator.args),
            f"{args.config}: generator",
        )
    else:
        if not args.pretrained:
            raise ConfigError("give --model MODEL (or --pretrained MODEL) or --config RUN_CONFIG")
        name = args.generator
        try:
            registry.lookup("generator", name)
        except KeyError as e:
            raise ConfigError(f"--generator: {e.args[0]}") from None
        config_cls = registry.lookup("generator", name).config
        gen_cfg = parse_dataclass(
            config_cls,
            {"pretrained": args.pretrained, "finetune": "none", **media_overrides(args, config_cls, name)},
            "generator",
        )
    try:
        gen = registry.lookup("generator", name).build(gen_cfg)
    except ValueError as e:  # a setting the loaded model cannot take (e.g. --duration past its maximum length)
        raise ConfigError(str(e)) from None
    if args.weights:
        w = Path(args.weights)
        gen.load_trained(w.parent if w.is_file() else w)  # a LoRA file or its directory
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    gen.to(device)
    if args.label_pairs:
        reps = [p for p in prompts for _ in range(args.n)]
        ro = write_for_labelling(
            gen,
            reps,
            [args.seed + i for i in range(len(reps))],
            args.out,
            args.steps,
            label_scale,
            args.eta,
            args.batch_size,
        )
        print(
            f"wrote {len(reps)} pairs ({len(ro)} samples) to {args.out}: buffer.safetensors, images/, pairs.jsonl. "
            f"Label them in the browser with `mmalign label {args.out}` (or set choice (0|1) or tie: true "
            f"on every line of pairs.jsonl), then train D3PO with "
            f"method.buffer={args.out} method.labels={Path(args.out) / 'pairs.jsonl'} reward=null"
        )
        return 0
    return run_sample(args, gen, prompts, device)


def _check_label_pairs(args: argparse.Namespace) -> float:
    """--label-pairs: plain CFG sampling with stochastic steps; returns the CFG scale."""
    mode, scale = parse_guidance(args.guidance, args.cfg_scale)
    if mode != "cfg" or args.reward:
        raise ConfigError(
            "--label-pairs: samples with plain CFG (--cfg-scale) and no --reward; "
            "the preferences come from the labeller"
        )
    if args.eta <= 0:
        raise ConfigError("--label-pairs: D3PO trains on the stochastic sampling steps; give --eta > 0 (e.g. 1.0)")
    return scale
