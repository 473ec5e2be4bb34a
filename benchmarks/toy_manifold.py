"""Are a toy generator's own samples on its training manifold? (a check for retraining sd_toy)

Fine-tuning on the model's own samples (RAFT, Diffusion-DPO on generated pairs, online DPO)
only passes a reward's selection on if those samples look like the data the model was trained
on. This prints the model's mean denoising error, per timestep, on three kinds of clean
latents of the same training captions:

    rendered   VAE latents of correctly rendered scenes (the training data)
    own        the model's own sampled latents (DDIM, CFG as in the rollouts)
    roundtrip  encode(decode(own)): what `reencode: true` trains on

A ratio own/rendered well above 1 means the samples are off-manifold: training on them moves
the model toward its own artifacts. Rendered and round-trip latents are VAE posterior draws,
as the model was trained (`generator.vae_latents`); the shipped model's ratio is 1.14-1.30 at
every timestep. Against posterior means it read 2-4 at low noise: the means, not the samples,
were off the training distribution (docs/results/toy-world-log.md).

    python benchmarks/toy_manifold.py [--model toy:sd_toy|PATH] [--n 32] [--steps 20] [--cfg 4]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TIMESTEPS = (20, 100, 300, 500, 700, 900)


@torch.no_grad()
def errors(gen, x0: torch.Tensor, cond, repeats: int = 4) -> dict[int, float]:
    out = {}
    for t in TIMESTEPS:
        g = torch.Generator().manual_seed(t)
        tt = torch.full((len(x0),), t, dtype=torch.long)
        e = [gen.denoise_error(x0, cond, tt, torch.randn(x0.shape, generator=g)).mean().item() for _ in range(repeats)]
        out[t] = float(np.mean(e))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="toy:sd_toy")
    ap.add_argument("--n", type=int, default=32, help="training captions (one sample each)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cfg", type=float, default=4.0)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "toy_manifold.json")
    args = ap.parse_args()

    from mmalign.pipelines.sd import LatentDiffusionGenerator, SDGeneratorConfig
    from mmalign.toy.world import render, train_captions

    torch.manual_seed(0)
    gen = LatentDiffusionGenerator(SDGeneratorConfig(pretrained=args.model, finetune="none"))
    caps = list(train_captions())[:: max(1, len(train_captions()) // args.n)][: args.n]
    seeds = list(range(len(caps)))
    with torch.no_grad():
        ro = gen.rollout(
            caps, num_steps=args.steps, guidance_scale=args.cfg, eta=0.0, seeds=seeds, need_log_probs=False
        )
        own = ro.latents[:, -1].float()
        roundtrip = gen.encode_images(ro.samples.images)
        scenes = torch.stack([torch.from_numpy(np.array(render(c, s))).permute(2, 0, 1) for c, s in zip(caps, seeds)])
        rendered = gen.encode_images(scenes.float() / 255)
    cond = gen.encode_prompt(caps)
    rows = {name: errors(gen, x, cond) for name, x in (("rendered", rendered), ("own", own), ("roundtrip", roundtrip))}
    print(
        f"model {args.model}: mean denoising error on {len(caps)} training captions "
        f"(own samples: DDIM {args.steps} steps, cfg {args.cfg})"
    )
    print(f"{'t':>5} {'rendered':>10} {'own':>10} {'roundtrip':>10} {'own/rend':>9} {'rt/rend':>8}")
    for t in TIMESTEPS:
        r, o, rt = rows["rendered"][t], rows["own"][t], rows["roundtrip"][t]
        print(f"{t:>5} {r:>10.4f} {o:>10.4f} {rt:>10.4f} {o / r:>9.2f} {rt / r:>8.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {"model": args.model, "n": len(caps), "steps": args.steps, "cfg": args.cfg, "errors": rows}, indent=1
        )
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
