"""Does fine-tuning on correct scenes fit the toy base better, and at which noise levels?

LoRA-fine-tunes toy:sd_toy with the plain denoising loss on rendered (correct) scenes of the
training captions, encoded as `--latents` (`sample`: VAE posterior draws, as the base was
trained; `mean`: the posterior mean), and prints the mean denoising error on 512 fixed
held-out-caption scenes (encoded the same way), split at t = 500, every `--every` steps.

With means the low-noise error falls fast while the high-noise error -- the steps that set
the composition -- rises: the fine-tune re-fits a latent distribution the base never saw
(docs/results/toy-world-log.md). With posterior draws neither moves: the base is converged on
them.

    python benchmarks/toy_latent_probe.py --latents mean --lr 1e-4
    python benchmarks/toy_latent_probe.py --latents sample --lr 1e-4
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="toy:sd_toy")
    ap.add_argument("--latents", choices=("sample", "mean"), default="sample")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--every", type=int, default=50)
    args = ap.parse_args()

    from mmalign.pipelines.common import LoraSettings
    from mmalign.pipelines.sd import LatentDiffusionGenerator, SDGeneratorConfig
    from mmalign.toy.world import heldout_captions, render, train_captions

    gen = LatentDiffusionGenerator(
        SDGeneratorConfig(pretrained=args.model, lora=LoraSettings(rank=16, alpha=16), vae_latents=args.latents)
    )
    g = torch.Generator().manual_seed(0)

    def scenes(caps, n: int, offset: int) -> tuple[list[str], torch.Tensor]:
        cs = [caps[i % len(caps)] for i in range(n)]
        ims = [torch.from_numpy(np.array(render(c, seed=offset + i))).permute(2, 0, 1) for i, c in enumerate(cs)]
        return cs, torch.stack(ims).float() / 255

    train_caps, train_images = scenes(list(train_captions()), 4096, 0)
    probe_caps, probe_images = scenes(list(heldout_captions()), 512, 900_000)
    probe_x0 = gen.encode_images(probe_images, range(512))
    probe_noise = torch.randn(probe_x0.shape, generator=g)
    probe_t = torch.randint(0, gen.num_train_timesteps, (512,), generator=g)
    chunks = [
        (
            probe_x0[i : i + 128],
            gen.encode_prompt(probe_caps[i : i + 128]),
            probe_t[i : i + 128],
            probe_noise[i : i + 128],
        )
        for i in range(0, 512, 128)
    ]

    @torch.no_grad()
    def probe() -> tuple[float, float]:
        err = torch.cat([gen.denoise_error(*chunk) for chunk in chunks])
        high = probe_t >= 500
        return float(err[~high].mean()), float(err[high].mean())

    params = [p for p in gen.trainable().parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-2)
    low0, high0 = probe()
    print(f"{args.model}, latents {args.latents}, LoRA lr {args.lr}, batch {args.batch}: held-out denoising error")
    print(f"{'step':>5} {'t<500':>8} {'t>=500':>8} {'Δ t<500':>8} {'Δ t>=500':>9}")
    print(f"{0:>5} {low0:>8.4f} {high0:>8.4f} {'':>8} {'':>9}")
    t0 = time.time()
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, len(train_caps), (args.batch,), generator=g)
        x0 = gen.encode_images(train_images[idx], (step * args.batch + torch.arange(args.batch)).tolist())
        t = torch.randint(0, gen.num_train_timesteps, (args.batch,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        loss = gen.denoise_error(x0, gen.encode_prompt([train_caps[i] for i in idx]), t, noise).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % args.every == 0:
            low, high = probe()
            print(f"{step:>5} {low:>8.4f} {high:>8.4f} {low / low0 - 1:>+8.1%} {high / high0 - 1:>+9.1%}")
    print(f"{(time.time() - t0) / args.steps:.2f} s/step")


if __name__ == "__main__":
    main()
