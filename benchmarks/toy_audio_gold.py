"""The toy audio world's gold evaluator and beep embedding, measured on the renderer's own clips.

    python benchmarks/toy_audio_gold.py --out benchmarks/results/toy_audio_gold.json

Gold accuracy of `gold_score_audio` (mmalign/toy/audio_gold.py) on `render_audio` clips of every
caption: clean (--seeds per caption), resampled 16 kHz -> 44.1 kHz -> 16 kHz with torchaudio,
scored at 44.1 kHz, and with white noise added at several levels (--robust-seeds per caption
each); and the rate at which it rejects each kind of hard-negative caption
(`perturb_audio_caption`) for the clean clips. Then the distribution rewards on the beep-band
embedding (`embedding: {name: toy_audio_gold}`): -FAD of low-beep and of high-beep clips to
low-beep exemplars, and the Vendi score of renders of one caption and of different captions.
Prints a table and writes JSON (--out), which docs/toy-world.md renders.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time

import torch
import torchaudio

from mmalign.rewards.common import build_reward
from mmalign.toy.audio_gold import gold_score_audio
from mmalign.toy.audio_world import AUDIO_PERTURBATIONS, all_audio_captions, perturb_audio_caption, render_audio
from mmalign.types import Samples

NOISE_DBFS = (-40.0, -30.0, -20.0)


def batch(captions, seeds):
    audio = torch.stack([torch.from_numpy(render_audio(c, s)[0])[None] for c, s in zip(captions, seeds)])
    return Samples(audio=audio, sample_rate=16000)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=50, help="clean renders per caption")
    ap.add_argument("--robust-seeds", type=int, default=10, help="resampled / noisy renders per caption and setting")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    caps = all_audio_captions()
    t0 = time.time()
    rows = []

    def measure(setting: str, fn, seeds: int) -> None:
        ok = [gold_score_audio(*fn(c, s), c)["correct"] for c in caps for s in range(seeds)]
        rows.append({"setting": setting, "clips": len(ok), "accuracy": sum(ok) / len(ok)})

    measure("clean, 16 kHz", lambda c, s: render_audio(c, s), args.seeds)

    def resampled(c, s, back=True):
        x = torchaudio.functional.resample(torch.from_numpy(render_audio(c, s)[0]), 16000, 44100)
        return (torchaudio.functional.resample(x, 44100, 16000), 16000) if back else (x, 44100)

    measure("resampled 16 -> 44.1 -> 16 kHz", resampled, args.robust_seeds)
    measure("resampled to 44.1 kHz", lambda c, s: resampled(c, s, back=False), args.robust_seeds)
    for db in NOISE_DBFS:

        def noisy(c, s, db=db):
            x = torch.from_numpy(render_audio(c, s)[0]).double()
            g = torch.Generator().manual_seed(s)
            return x + 10 ** (db / 20) * torch.randn(x.shape, generator=g, dtype=torch.float64), 16000

        measure(f"white noise at {db:.0f} dBFS added", noisy, args.robust_seeds)

    rng = random.Random(0)
    negatives = []
    for mode in AUDIO_PERTURBATIONS:
        rejected, n = 0, 0
        for c in caps:
            for s in range(args.robust_seeds):
                neg = perturb_audio_caption(c, rng, mode)
                if neg is None:
                    continue
                w, sr = render_audio(c, s)
                rejected += not gold_score_audio(w, sr, neg)["correct"]
                n += 1
        negatives.append({"perturbation": mode, "pairs": n, "rejected": rejected / n})

    low = ["one low beep", "two low beeps", "three low beeps"]
    high = [c.replace("low", "high") for c in low]
    fad = build_reward(
        {
            "name": "fad",
            "embedding": {"name": "toy_audio_gold"},
            "exemplars": "toy:render_audio",
            "exemplar_prompts": low,
            "exemplar_seeds": 4,
        }
    )
    vendi = build_reward({"name": "vendi", "embedding": {"name": "toy_audio_gold"}})
    seeds6 = [100 + i for i in range(6)]
    dist = [
        {
            "measure": "-FAD, 6 low-beep clips vs low-beep exemplars",
            "value": float(fad.score_batch(batch(low * 2, seeds6), low * 2)[0]),
        },
        {
            "measure": "-FAD, 6 high-beep clips vs low-beep exemplars",
            "value": float(fad.score_batch(batch(high * 2, seeds6), low * 2)[0]),
        },
        {
            "measure": "Vendi, 6 renders of one caption",
            "value": float(vendi.score_batch(batch(["one low beep"] * 6, range(6)), ["x"] * 6)[0]),
        },
        {
            "measure": "Vendi, 6 different captions",
            "value": float(vendi.score_batch(batch(low + high, [0] * 6), ["x"] * 6)[0]),
        },
    ]
    out = {
        "settings": {
            "seeds": args.seeds,
            "robust_seeds": args.robust_seeds,
            "captions": len(caps),
            "exemplar_seeds": 4,
        },
        "device": platform.processor() or platform.machine(),
        "seconds": round(time.time() - t0, 1),
        "gold": rows,
        "negatives": negatives,
        "distribution": dist,
    }
    for r in rows:
        print(f"{r['setting']:40s} {r['clips']:6d} clips  accuracy {r['accuracy']:.4f}")
    for r in negatives:
        print(f"negatives: {r['perturbation']:8s} {r['pairs']:6d} pairs  rejected {r['rejected']:.4f}")
    for r in dist:
        print(f"{r['measure']:48s} {r['value']:.4f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
            f.write("\n")


if __name__ == "__main__":
    main()
