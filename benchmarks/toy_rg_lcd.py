"""Toy-world RG-LCD table: the few-step student's held-out gold accuracy vs. its teacher's.

    python benchmarks/toy_rg_lcd.py                              # teacher rows + LCD and RG-LCD (LRM) runs
    python benchmarks/toy_rg_lcd.py --variants lcd lrm expert --set train.steps=100
    python benchmarks/toy_rg_lcd.py --variants lcd --runs runs/bench/rg_lcd-lcd   # only evaluate a run's final/

Rows: the teacher (toy:sd_toy, deterministic DDIM, CFG 4) at 20 and 50 steps (and at 4, the
few-step baseline without distillation), and each student
(the run's final/ pipeline, LCMScheduler, guidance embedding of s - 1 with s = 4) at 1, 2 and 4
steps. Every row samples the same captions and seeds (toy:heldout x 2 seeds from 1234) and
reports held-out gold accuracy, compositional gold accuracy, the proxy reward (toy CLIP; the
reward RG-LCD optimises, so gold is the honest column), diversity and sampling seconds.
Variants: lcd = `method.reward_weight=0` (plain latent consistency distillation), lrm = the
config as shipped (latent proxy reward model), expert = `method.reward_path=expert`.
Writes benchmarks/results/toy_rg_lcd.json. Not a test: numbers depend on the machine's load only
through the seconds column.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = {"lcd": ["method.reward_weight=0"], "lrm": [], "expert": ["method.reward_path=expert"]}


def evaluate(gen, reward, prompts, steps: int, guidance: float) -> dict:
    from mmalign.evaluation import evaluate_generator

    t = time.perf_counter()
    out, _ = evaluate_generator(
        gen, reward, prompts, seeds_per_prompt=2, seed=1234, num_steps=steps, guidance_scale=guidance, gold=True
    )
    return {
        "steps": steps,
        "gold": out["gold_accuracy"],
        "compositional": out["gold_compositional"],
        "proxy": out.get("reward"),
        "diversity": out.get("diversity"),
        "sample_s": time.perf_counter() - t,
        "per_kind": out["gold_per_kind"],
    }


def main() -> None:
    import torch

    from mmalign.config import load_config
    from mmalign.data.generated import load_prompts
    from mmalign.pipelines.sd import LatentDiffusionGenerator, SDGeneratorConfig
    from mmalign.rewards.clip import ClipRewardConfig, ClipScore
    from mmalign.trainer import Trainer

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "toy" / "rg_lcd.yaml")
    ap.add_argument("--variants", nargs="*", default=["lcd", "lrm"], choices=sorted(VARIANTS))
    ap.add_argument("--runs", nargs="*", type=Path, help="existing run dirs (one per variant): evaluate only")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", nargs="*", default=[], help="config overrides for every run")
    ap.add_argument("--teacher-steps", nargs="*", type=int, default=[4, 20, 50])
    ap.add_argument("--student-steps", nargs="*", type=int, default=[1, 2, 4])
    ap.add_argument("--guidance", type=float, default=4.0)
    ap.add_argument("--out-root", type=Path, default=ROOT / "runs" / "bench")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "toy_rg_lcd.json")
    args = ap.parse_args()
    if args.runs and len(args.runs) != len(args.variants):
        raise SystemExit(f"--runs: give one run directory per variant ({len(args.variants)})")

    device = "cuda" if torch.cuda.is_available() else "cpu"
    rc = ClipRewardConfig(model="toy:proxy_clip")
    rc.validate()
    reward = ClipScore(rc).to(device)
    prompts = load_prompts("toy:heldout")
    rows = []
    teacher = LatentDiffusionGenerator(SDGeneratorConfig(pretrained="toy:sd_toy", finetune="none")).to(device)
    for s in args.teacher_steps:
        rows.append(
            {
                "model": "teacher (DDIM)",
                "variant": "-",
                "train_s": None,
                **evaluate(teacher, reward, prompts, s, args.guidance),
            }
        )
        print(rows[-1])
    del teacher
    for i, v in enumerate(args.variants):
        if args.runs:
            run_dir, train_s = args.runs[i], None
        else:
            run_dir = args.out_root / f"rg_lcd-{v}-seed{args.seed}"
            cfg = load_config(args.config, [f"run.seed={args.seed}", "eval.enabled=false", *VARIANTS[v], *args.set])
            t = time.perf_counter()
            Trainer(cfg, run_dir=run_dir).fit()
            train_s = time.perf_counter() - t
        student = LatentDiffusionGenerator(SDGeneratorConfig(pretrained=str(run_dir / "final"), finetune="none"))
        student.to(device)
        if student.lcm_scheduler is None:
            raise SystemExit(f"{run_dir / 'final'}: not an LCM student (no LCMScheduler)")
        for s in args.student_steps:
            rows.append(
                {
                    "model": "student (LCM)",
                    "variant": v,
                    "run": str(run_dir),
                    "train_s": train_s,
                    **evaluate(student, reward, prompts, s, args.guidance),
                }
            )
            print(rows[-1])
    fmt = lambda x: "-" if x is None else (f"{x:.3f}" if isinstance(x, float) else str(x))
    print(f"\nheld-out captions: {len(prompts)} x 2 seeds; guidance scale {args.guidance}\n")
    print("| model | variant | steps | gold acc | compositional | proxy reward | diversity | sample s | train s |")
    print("|---" * 9 + "|")
    for r in rows:
        train = "-" if r["train_s"] is None else f"{r['train_s']:.0f}"
        print(
            f"| {r['model']} | {r['variant']} | {r['steps']} | {fmt(r['gold'])} | {fmt(r['compositional'])} | "
            f"{fmt(r['proxy'])} | {fmt(r['diversity'])} | {r['sample_s']:.1f} | {train} |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
