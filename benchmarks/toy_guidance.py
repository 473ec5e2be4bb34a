"""Toy-world table for inference-time alignment (no training): static CFG scales, dynamic
CFG, reward-gradient guidance, best-of-N and per-step beam search, on the shipped toy model
with the toy proxy CLIP as the steering reward and the exact gold evaluator as the judge.

    python benchmarks/toy_guidance.py                                   # every method (~13 min on 1 core)
    python benchmarks/toy_guidance.py --methods cfg dynamic-cfg         # a part; results merge into --out
    python benchmarks/toy_guidance.py --table                           # print the table from --out

A method stopped by a time limit resumes from its finished batches on the next run.

Columns, over held-out captions x seeds (deterministic DDIM, eta=0, except beam):
  gold acc      strict gold accuracy (mmalign.toy.evaluate.gold_report); Δ vs best: its difference
                from the best static scale on the same captions and seeds, with the paired standard error
  gold frac     mean fraction of a caption's constraints satisfied (rewards.rules toy_gold "fraction")
  proxy         mean toy proxy CLIP reward (the reward the guided methods steer by: over-optimisation
                shows as proxy up, gold flat)
  win vs best   per sample (same caption and seed) win rate against the best static CFG scale
                (best by gold accuracy on this same set: an oracle choice), on gold fraction, ties 1/2
  cpu s / cost  sampling CPU time of the process (model + evaluators + decoding; not the gold
                scoring; CPU time, so a busy shared machine does not distort it at --threads 1)
                and its excess over CFG at --ref-scale, as a percentage of that sampling time
Writes (and merges into) benchmarks/results/toy_guidance.json with per-sample scores.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

METHODS = ("cfg", "dynamic-cfg", "reward", "best-of-n", "beam")


def _batches(n: int, bs: int):
    for i in range(0, n, bs):
        yield slice(i, min(i + bs, n))


def run_method(
    name: str, gen, proxy, prompts: list[str], seeds: list[int], a: argparse.Namespace, config: dict
) -> list[dict]:
    """Rows {method, kind, images, seconds (CPU), wall_seconds, ...} of one method (cfg: one per scale).

    Finished batches are kept under <out>.partial/ so that a run stopped by a time limit
    resumes where it stopped (CPU seconds add up across the pieces)."""
    import torch

    from mmalign.guidance import (
        Evaluator,
        beam_search_sample,
        best_of_n_sample,
        dynamic_cfg_sample,
        reward_guided_sample,
    )

    def timed(label: str, kind: str, fn, **row) -> dict:
        part = a.out.parent / (a.out.stem + ".partial") / (label.replace(" ", "_").replace("/", "_") + ".pt")
        st = {"config": config, "images": [], "schedules": [], "cpu": 0.0, "wall": 0.0}
        if part.is_file():
            old = torch.load(part, weights_only=True)
            if old["config"] == config:
                st = old
        for b, sl in enumerate(_batches(len(prompts), a.batch_size)):
            if b < len(st["images"]):
                continue
            t, c = time.perf_counter(), time.process_time()
            ro = fn(prompts[sl], seeds[sl])
            st["cpu"] += time.process_time() - c
            st["wall"] += time.perf_counter() - t
            st["images"].append(ro.samples.images.float().cpu())
            if "cfg_schedule" in ro.extras:
                st["schedules"].append(ro.extras["cfg_schedule"])
            part.parent.mkdir(parents=True, exist_ok=True)
            torch.save(st, part)
        out = {
            "method": label,
            "kind": kind,
            "images": torch.cat(st["images"]),
            "seconds": st["cpu"],
            "wall_seconds": st["wall"],
            **row,
        }
        if st["schedules"]:
            out["cfg_schedule"] = torch.cat(st["schedules"]).tolist()
        return out

    ref, steps = a.ref_scale, a.steps
    if name == "cfg":
        return [
            timed(
                f"cfg {s:g}",
                "cfg",
                lambda p, sd, s=s: gen.rollout(
                    p, num_steps=steps, guidance_scale=s, eta=0.0, seeds=sd, need_log_probs=False
                ),
                scale=s,
            )
            for s in a.scales
        ]
    if name == "dynamic-cfg":
        ev = Evaluator(proxy, weight=1.0, name="proxy")
        label = "dynamic-cfg {" + ",".join(f"{c:g}" for c in a.candidates) + "}"
        return [
            timed(
                label,
                name,
                lambda p, sd: dynamic_cfg_sample(gen, p, ev, candidates=a.candidates, num_steps=steps, seeds=sd),
            )
        ]
    if name == "reward":
        w = a.reward_weight
        ev = Evaluator(proxy, weight=tuple(w), name="proxy")
        return [
            timed(
                f"reward grad w={w[0]:g}..{w[1]:g} @cfg {ref:g}",
                name,
                lambda p, sd: reward_guided_sample(gen, p, ev, guidance_scale=ref, num_steps=steps, seeds=sd),
            )
        ]
    if name == "best-of-n":
        return [
            timed(
                f"best-of-{a.best_of} @cfg {ref:g}",
                name,
                lambda p, sd: best_of_n_sample(
                    gen, p, proxy, n=a.best_of, guidance_scale=ref, num_steps=steps, seeds=sd, batch_size=a.batch_size
                ),
            )
        ]
    if name == "beam":
        return [
            timed(
                f"beam W=1 K={a.beam_k} eta=1 @cfg {ref:g}",
                name,
                lambda p, sd: beam_search_sample(
                    gen,
                    p,
                    proxy,
                    beam_width=1,
                    num_candidates=a.beam_k,
                    guidance_scale=ref,
                    num_steps=steps,
                    seeds=sd,
                    eta=1.0,
                    batch_size=a.batch_size,
                ),
            )
        ]
    raise ValueError(f"unknown method {name!r}")


def score(row: dict, proxy, prompts: list[str]) -> dict:
    import torch

    from mmalign.toy.evaluate import gold_report
    from mmalign.toy.reward import gold_to_score
    from mmalign.types import Samples

    imgs = row.pop("images")
    rep = gold_report(imgs, prompts)
    with torch.no_grad():
        px = torch.cat([proxy(Samples(images=imgs[sl]), prompts[sl]) for sl in _batches(len(prompts), 128)])
    row.update(
        gold_acc=rep["accuracy"],
        gold_comp=rep["compositional"],
        gold_correct=[int(bool(s["correct"])) for s in rep["scores"]],
        gold_frac=[gold_to_score(s, "fraction") for s in rep["scores"]],
        proxy=px.tolist(),
    )
    return row


def win_rate(a: list[float], b: list[float]) -> float:
    return sum(1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b)) / len(a)


def paired_diff(a: list[int], b: list[int]) -> tuple[float, float]:
    """Mean of a - b over paired samples and its standard error."""
    d = [x - y for x, y in zip(a, b)]
    m = sum(d) / len(d)
    var = sum((x - m) ** 2 for x in d) / max(len(d) - 1, 1)
    return m, (var / len(d)) ** 0.5


def table(res: dict) -> str:
    rows = res["rows"]
    cfg_rows = [r for r in rows.values() if r["kind"] == "cfg"]
    if not cfg_rows:
        return "(no cfg rows yet: run --methods cfg)"
    best = max(cfg_rows, key=lambda r: (r["gold_acc"], sum(r["gold_frac"])))
    ref = next((r for r in cfg_rows if r["scale"] == res["config"]["ref_scale"]), best)
    mean = lambda v: sum(v) / len(v)
    lines = [
        f"{res['config']['n_samples']} samples = {res['config']['n_captions']} held-out captions x "
        f"{res['config']['seeds']} seeds, {res['config']['steps']} DDIM steps; best static scale: "
        f"{best['method']}; cost relative to {ref['method']}",
        f"{'method':38s}{'gold acc':>9s}{'Δ vs best (s.e.)':>18s}{'gold frac':>10s}{'proxy':>8s}"
        f"{'win vs best':>12s}{'cpu s':>8s}{'cost':>9s}",
    ]
    for r in rows.values():
        win = "-" if r is best else f"{win_rate(r['gold_frac'], best['gold_frac']):.3f}"
        delta = "-" if r is best else "{:+.3f} ({:.3f})".format(*paired_diff(r["gold_correct"], best["gold_correct"]))
        cost = (r["seconds"] / ref["seconds"] - 1) * 100
        lines.append(
            f"{r['method']:38s}{r['gold_acc']:9.3f}{delta:>18s}{mean(r['gold_frac']):10.3f}"
            f"{mean(r['proxy']):8.3f}{win:>12s}{r['seconds']:8.1f}{cost:+8.0f}%"
        )
    dyn = [r for r in rows.values() if r["kind"] == "dynamic-cfg"]
    for r in dyn:
        import collections

        flat = collections.Counter(s for sched in r["cfg_schedule"] for s in sched)
        n = sum(flat.values())
        lines.append(
            f"  {r['method']}: chosen scales "
            + ", ".join(f"{k:g}: {v / n:.0%}" for k, v in sorted(flat.items()))
            + f"; proxy win rate vs best static {win_rate(r['proxy'], best['proxy']):.3f}"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="*", default=list(METHODS), choices=METHODS)
    ap.add_argument("--captions", default="toy:heldout")
    ap.add_argument("--max-captions", type=int)
    ap.add_argument("--seeds", type=int, default=2, help="seeds per caption")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--scales", type=float, nargs="*", default=[2.0, 3.0, 4.0, 5.0, 7.5])
    ap.add_argument(
        "--ref-scale", type=float, default=4.0, help="CFG scale of reward / best-of-n / beam, cost baseline"
    )
    ap.add_argument(
        "--candidates",
        type=float,
        nargs="*",
        default=[4.0, 2.0, 3.0, 5.0, 7.5],
        help="dynamic-cfg candidates (the first wins ties)",
    )
    ap.add_argument(
        "--reward-weight",
        type=float,
        nargs=2,
        default=[0.0, 80.0],
        metavar=("START", "END"),
        help="reward guidance weight, linear over the steps",
    )
    ap.add_argument("--best-of", type=int, default=4)
    ap.add_argument("--beam-k", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "toy_guidance.json")
    ap.add_argument("--fresh", action="store_true", help="discard earlier results in --out")
    ap.add_argument("--table", action="store_true", help="only print the table from --out")
    a = ap.parse_args()

    if a.table:
        print(table(json.loads(a.out.read_text())))
        return
    import torch

    torch.set_num_threads(a.threads)
    from mmalign.data.generated import load_prompts
    from mmalign.pipelines.sd import LatentDiffusionGenerator, SDGeneratorConfig
    from mmalign.rewards.common import build_reward

    captions = load_prompts(a.captions)[: a.max_captions]
    prompts = [c for c in captions for _ in range(a.seeds)]
    seeds = [1234 + i for i in range(len(prompts))]  # as mmalign.evaluation.evaluate_generator draws them
    config = {
        "captions": a.captions,
        "n_captions": len(captions),
        "seeds": a.seeds,
        "n_samples": len(prompts),
        "steps": a.steps,
        "ref_scale": a.ref_scale,
    }
    res = {"config": config, "rows": {}}
    if a.out.is_file() and not a.fresh:
        old = json.loads(a.out.read_text())
        if old.get("config") != config:
            raise SystemExit(f"{a.out}: holds results for {old.get('config')}, not {config}; use --fresh or --out")
        res = old
    partial = a.out.parent / (a.out.stem + ".partial")
    if a.fresh and partial.is_dir():
        import shutil

        shutil.rmtree(partial)  # --fresh: no resuming from earlier batches either
    gcfg = SDGeneratorConfig(pretrained="toy:sd_toy", finetune="none")
    gcfg.validate()
    gen = LatentDiffusionGenerator(gcfg)
    proxy = build_reward({"name": "clip", "model": "toy:proxy_clip"}, "proxy")
    for m in a.methods:
        for row in run_method(m, gen, proxy, prompts, seeds, a, config):
            row = score(row, proxy, prompts)
            res["rows"][row["method"]] = row
            print(
                f"{row['method']}: gold {row['gold_acc']:.3f} proxy {sum(row['proxy']) / len(row['proxy']):.3f} "
                f"{row['seconds']:.1f}s",
                flush=True,
            )
            a.out.parent.mkdir(parents=True, exist_ok=True)
            a.out.write_text(json.dumps(res))
    print()
    print(table(res))


if __name__ == "__main__":
    main()
