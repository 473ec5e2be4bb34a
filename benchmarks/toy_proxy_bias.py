"""How the proxy reward orders *wrong* scenes: one extra object vs. one object missing.

    python benchmarks/toy_proxy_bias.py [--proxy toy:proxy_clip] [--pairs RUN_DIR ...]

The gold evaluator fails both (an extra object breaks `no_extra_objects` and usually the count,
a missing one the count and binding). A CLIP-style score penalises them differently, and that
difference is what preference pairs ranked by it teach: between two imperfect samples the one
with the extra object wins. For every multi-object caption (held-out and a third of the training
captions, 2 layouts each) the table gives the proxy's mean score of the correct scene, of the
scene with one more object (`mmalign.toy.world.extra_object_scene`) and of the scene with its
last object left out, and how often each ordering holds.

`--pairs RUN_DIR` also reads a run's generated preference pairs (`data.kind: generated`) and
reports the mean number of detected objects and each gold constraint for chosen vs. rejected.
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


def scene_table(proxy: str) -> None:
    from mmalign.paths import resolve
    from mmalign.toy.proxy import load_proxy, scene_negatives
    from mmalign.toy.world import heldout_captions, train_captions

    _, _, score = load_proxy(resolve(proxy))
    r = scene_negatives(score, heldout_captions() + train_captions()[::3])
    print(f"\nproxy {proxy}: {r['n']} multi-object scenes")
    print("| scene | mean proxy score | drop from correct |\n|---|---|---|")
    print(f"| correct | {r['mean_correct']:.3f} | 0.000 |")
    print(f"| extra | {r['mean_extra']:.3f} | {r['drop_extra']:.3f} |")
    print(f"| missing | {r['mean_missing']:.3f} | {r['drop_missing']:.3f} |")
    print(
        f"\ncorrect > extra: {r['correct_over_extra']:.3f}; correct > missing: {r['correct_over_missing']:.3f}; "
        f"extra > missing: {r['extra_over_missing']:.3f}"
    )


def pairs_table(run: Path) -> None:
    from safetensors.torch import load_file

    from mmalign.media import tensor_to_pil
    from mmalign.pipelines.sd import LatentDiffusionGenerator, SDGeneratorConfig
    from mmalign.toy.gold import detect, gold_score

    meta = json.loads((run / "generated_pairs.json").read_text())
    prompts = json.loads((run / "generated_pairs.prompts.json").read_text())
    latents = load_file(str(run / "generated_pairs.safetensors"))
    gen = LatentDiffusionGenerator(SDGeneratorConfig(pretrained=meta["model"], finetune="none"))
    rows = {}
    for side, name in (("w", "chosen"), ("l", "rejected")):
        objects, checks = [], {}
        with torch.no_grad():
            for i in range(0, len(prompts), 64):
                for im, p in zip(gen.decode(latents[side][i : i + 64]).images, prompts[i : i + 64]):
                    pil = tensor_to_pil(im)
                    objects.append(len(detect(pil)))
                    for k, v in gold_score(pil, p).items():
                        if isinstance(v, bool):
                            checks.setdefault(k, []).append(float(v))
        rows[name] = {"objects": float(np.mean(objects)), **{k: float(np.mean(v)) for k, v in checks.items()}}
    keys = list(rows["chosen"])
    print(f"\n{run}: {len(prompts)} pairs")
    print("| | " + " | ".join(keys) + " |\n" + "|---" * (len(keys) + 1) + "|")
    for name, r in rows.items():
        print(f"| {name} | " + " | ".join(f"{r[k]:.3f}" for k in keys) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--proxy", default="toy:proxy_clip")
    ap.add_argument("--pairs", nargs="*", type=Path, default=[], help="run directories with generated pairs")
    args = ap.parse_args()
    scene_table(args.proxy)
    for run in args.pairs:
        pairs_table(run)


if __name__ == "__main__":
    main()
