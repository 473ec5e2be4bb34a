"""Toy VLM hallucination table: one row per VLM preference config.

    OMP_NUM_THREADS=1 python benchmarks/toy_vlm.py                  # configs/toy/vlm_*.yaml
    python benchmarks/toy_vlm.py --configs configs/toy/vlm_dpo.yaml --set train.steps=100

Each config trains the shipped toy VLM (toy:vlm_toy) on toy-world pairs; the held-out
hallucination rate (greedy answers on a fixed set of held-out scenes, per question type)
is measured before and after. Writes benchmarks/results/toy_vlm.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TYPES = ("color", "count", "exist", "describe", "overall")


def heldout_items(n_scenes: int):
    from mmalign.toy.vlm_world import eval_set

    return eval_set("heldout", n_scenes, seed=0)


def base_rates(items) -> dict:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from mmalign.paths import resolve
    from mmalign.toy.vlm_world import evaluate

    path = resolve("toy:vlm_toy")
    return evaluate(AutoModelForImageTextToText.from_pretrained(path), AutoProcessor.from_pretrained(path), items)


def run_one(config: Path, overrides: list[str], out_root: Path, items) -> dict:
    from mmalign.config import load_config
    from mmalign.toy.vlm_world import evaluate
    from mmalign.trainer import Trainer

    cfg = load_config(config, overrides)
    t = time.perf_counter()
    trainer = Trainer(cfg, run_dir=out_root / config.stem)
    trainer.fit()
    wall = time.perf_counter() - t
    gen = trainer.generator
    after = evaluate(gen.model, gen.processor, items)
    m = cfg.method.args
    return {
        "config": str(config.relative_to(ROOT)),
        "loss_type": m.loss_type,
        "beta": m.beta,
        "data": cfg.data.path,
        "steps": cfg.train.steps,
        "after": after,
        "wall_s": wall,
    }


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="*", type=Path, default=sorted((ROOT / "configs" / "toy").glob("vlm_*.yaml")))
    ap.add_argument("--set", nargs="*", default=[], help="config overrides for every run")
    ap.add_argument("--heldout-scenes", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out-root", type=Path, default=ROOT / "runs" / "bench_vlm")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "toy_vlm.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    items = heldout_items(args.heldout_scenes)
    before = base_rates(items)
    rows = [run_one(c.resolve(), args.set, args.out_root, items) for c in args.configs]
    print(
        f"\nheld-out hallucination rate (greedy; {before['n']} questions on {args.heldout_scenes} held-out scenes), "
        "base toy VLM -> after training\n"
    )
    print("| config | loss | steps | " + " | ".join(TYPES) + " | wall s |")
    print("|---" * (len(TYPES) + 4) + "|")
    for r in rows:
        cells = " | ".join(f"{before[k]:.3f} → {r['after'][k]:.3f}" for k in TYPES)
        print(f"| {Path(r['config']).name} | {r['loss_type']} | {r['steps']} | {cells} | {r['wall_s']:.0f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"before": before, "heldout_scenes": args.heldout_scenes, "rows": rows}, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
