"""The supervised ceiling of the toy world: fine-tune on *correct* rendered scenes.

    python benchmarks/toy_sft_ceiling.py                                   # raft.yaml's regime
    python benchmarks/toy_sft_ceiling.py --set train.lr=1e-4 train.steps=300 train.ema_decay=0.99
    python benchmarks/toy_sft_ceiling.py --set generator.finetune=lora train.lr=1e-3

Every reward a method could optimise stands in for one thing: which scenes are correct.
This control hands the fine-tuning that answer directly. It runs RAFT's training path
(`configs/toy/raft.yaml` without its baseline: the same trainer, denoising loss and budget) with
x0 replaced by VAE posterior draws of scenes `mmalign.toy.world.render` drew correctly for the
round's training captions; nothing is sampled (the reward only scores the evaluations). If held-out gold
does not rise here, no alignment method can be expected to raise it at the same budget, and the toy table cannot
rank methods there. Prints held-out gold before -> after (and per constraint) for each
evaluation and writes benchmarks/results/toy_sft_ceiling.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mmalign.methods.raft import RAFT, RAFTConfig  # noqa: E402
from mmalign.registry import register_method  # noqa: E402
from mmalign.types import Rollout, Samples  # noqa: E402


@dataclass
class RenderSFTConfig(RAFTConfig):
    def validate(self) -> None:  # every rendered scene is kept: no top_k filter to check
        pass


class RenderSFT(RAFT):
    """RAFT whose 'best samples' are correct renders: supervised fine-tuning on the world."""

    def collect(self, generator, reward, prompts, seeds):
        from mmalign.toy.world import render

        G = self.rollout.samples_per_prompt
        rep = [p for p in prompts for _ in range(G)]
        layout_seeds = [s * 1009 + j for s in seeds for j in range(G)]
        pix = np.stack([np.asarray(render(p, s)) for p, s in zip(rep, layout_seeds)])
        images = torch.from_numpy(pix).permute(0, 3, 1, 2).float().div(255).to(generator.device)
        x0 = generator.encode_images(images, layout_seeds).contiguous()
        n = len(rep)
        ones = lambda: torch.ones(n, device=x0.device)  # noqa: E731 (checkpoints refuse shared storage)
        return Rollout(
            samples=Samples(images=images),
            latents=x0[:, None].clone(),
            timesteps=torch.zeros(0, dtype=torch.long),
            log_probs=None,
            prompts=rep,
            extras={
                "x0": x0,
                "rewards": ones(),
                "weights": ones(),
                "keep": torch.arange(n, device=x0.device),
                "group": torch.arange(len(prompts), device=x0.device).repeat_interleave(G),
            },
        )


register_method("render_sft", RenderSFTConfig)(lambda cfg: RenderSFT(cfg))


def main() -> None:
    from mmalign.config import load_config
    from mmalign.trainer import Trainer

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "toy" / "raft.yaml")
    ap.add_argument("--set", nargs="*", default=[], help="config overrides, e.g. train.lr=1e-4")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-root", type=Path, default=ROOT / "runs" / "sft_ceiling")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "toy_sft_ceiling.json")
    args = ap.parse_args()
    cfg = load_config(
        args.config,
        ["method.name=render_sft", "method.baseline=false", "eval.gold=true", f"run.seed={args.seed}", *args.set],
    )
    run_dir = args.out_root / f"seed{args.seed}-{int(time.time())}"
    t = time.perf_counter()
    Trainer(cfg, run_dir=run_dir).fit()
    wall = time.perf_counter() - t
    rows = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "eval" in r]
    print(
        f"\nsupervised fine-tuning on correct renders ({' '.join(args.set) or 'raft.yaml defaults'}), "
        f"{cfg.train.steps} steps, {wall:.0f} s"
    )
    print("| step | held-out gold | samples | " + " | ".join(rows[0]["eval"].get("gold_per_constraint", {})) + " |")
    print("|---" * (3 + len(rows[0]["eval"].get("gold_per_constraint", {}))) + "|")
    for r in rows:
        e = r["eval"]
        per = " | ".join(f"{v:.3f}" for v in e.get("gold_per_constraint", {}).values())
        print(f"| {r['step']} | {e['gold_accuracy']:.3f} | {e['n_samples']} | {per} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "overrides": args.set,
                "seed": args.seed,
                "wall_s": wall,
                "evals": [{"step": r["step"], **r["eval"]} for r in rows],
            },
            indent=2,
        )
    )
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
