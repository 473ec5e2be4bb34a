"""Toy-world alignment table: one row per method config (and run seed).

    python benchmarks/toy_alignment.py                       # every configs/toy/*.yaml, seed 0
    python benchmarks/toy_alignment.py --configs configs/toy/diffusion_dpo.yaml --seeds 0 1 2
    python benchmarks/toy_alignment.py --set train.steps=100  # overrides for every run

Rows cover the UNet methods (generator `sd`, toy:sd_toy) and the flow-matching ones (generator
`flow`, toy:sd3_toy: flow_grpo.yaml, flow_dpo.yaml, diffusion_nft.yaml).
Columns: held-out proxy reward and gold accuracy before -> after, compositional gold
accuracy, diversity (mean pairwise pixel distance across seeds of a caption: a collapse
shows here), wall time and the number of generated samples the method consumed.
Merges its rows into benchmarks/results/toy_alignment.json (a row of the same config, seed and
overrides is replaced), from which the docs' results pages are generated.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run_one(config: Path, seed: int, overrides: list[str], out_root: Path) -> dict:
    from mmalign.config import load_config
    from mmalign.trainer import Trainer

    # the row's "before" is the run's own step-0 evaluation
    cfg = load_config(config, [f"run.seed={seed}", "eval.gold=true", *overrides, "eval.at_start=true"])
    run_dir = out_root / f"{config.stem}-seed{seed}"
    t = time.perf_counter()
    Trainer(cfg, run_dir=run_dir).fit()
    wall = time.perf_counter() - t
    evals = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "eval" in r]
    data = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "data/pairs" in r]
    b, a = evals[0]["eval"], evals[-1]["eval"]
    samples = 0
    if cfg.data.kind == "generated":
        from mmalign.data.generated import load_prompts

        n = len(load_prompts(cfg.data.prompts))
        samples = min(n, cfg.data.max_samples or n) * cfg.data.candidates
    elif cfg.data.kind == "prompts":  # online: every round samples prompts_per_round x samples_per_prompt
        rs = cfg.method.args.rollout
        samples = -(-cfg.train.steps // rs.steps_per_round) * rs.prompts_per_round * rs.samples_per_prompt
    name = str(config.relative_to(ROOT) if config.is_relative_to(ROOT) else config)
    return {
        "method": cfg.method.name,
        "generator": cfg.generator.name,
        "config": name,
        "overrides": overrides,
        "reward": cfg.reward.name if cfg.reward else None,
        "seed": seed,
        "steps": cfg.train.steps,
        "pairs": data[-1]["data/pairs"] if data else None,
        "proxy_before": b.get("reward"),
        "proxy_after": a.get("reward"),
        "gold_before": b.get("gold_accuracy"),
        "gold_after": a.get("gold_accuracy"),
        "comp_before": b.get("gold_compositional"),
        "comp_after": a.get("gold_compositional"),
        "div_before": b.get("diversity"),
        "div_after": a.get("diversity"),
        "wall_s": wall,
        "samples_generated": samples,
        "eval_samples": a.get("n_samples"),
    }


def merge(path: Path, rows: list[dict]) -> list[dict]:
    """The rows already in `path` with those of the same config, seed and overrides replaced by `rows`."""
    key = lambda r: (r["config"], r["seed"], tuple(r.get("overrides") or ()))
    new = {key(r) for r in rows}
    old = json.loads(path.read_text()) if path.is_file() else []
    return [r for r in old if key(r) not in new] + rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--configs",
        nargs="*",
        type=Path,  # the VLM configs have their own table: toy_vlm.py
        default=sorted(p for p in (ROOT / "configs" / "toy").glob("*.yaml") if not p.stem.startswith("vlm_")),
    )
    ap.add_argument("--seeds", nargs="*", type=int, default=[0])
    ap.add_argument("--set", nargs="*", default=[], help="config overrides for every run")
    ap.add_argument("--out-root", type=Path, default=ROOT / "runs" / "bench")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "toy_alignment.json")
    args = ap.parse_args()
    rows = [run_one(c.resolve(), s, args.set, args.out_root) for c in args.configs for s in args.seeds]
    fmt = lambda v: "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))
    print(
        "\n| method | generator | reward | seed | steps | pairs | proxy before→after | gold before→after | "
        "compositional before→after | diversity before→after | wall s | samples |"
    )
    print("|---" * 12 + "|")
    for r in rows:
        print(
            f"| {r['method']} | {r['generator']} | {r['reward']} | {r['seed']} | {r['steps']} | {fmt(r['pairs'])} | "
            f"{fmt(r['proxy_before'])}→{fmt(r['proxy_after'])} | {fmt(r['gold_before'])}→{fmt(r['gold_after'])} | "
            f"{fmt(r['comp_before'])}→{fmt(r['comp_after'])} | {fmt(r['div_before'])}→{fmt(r['div_after'])} | "
            f"{r['wall_s']:.0f} | {r['samples_generated']} |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(merge(args.out, rows), indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
