"""MkDocs hook: fills generated blocks in the docs pages at build time.

Three kinds of placeholder, each an HTML comment on a line of its own:

- `<!-- results: toy_alignment -->` (optionally `method=NAME`, `generator=NAME`, `config=PATH`):
  a table rendered from `benchmarks/results/<name>.json`, the file the benchmark script of the
  same name writes. Numbers in the docs therefore always come from those files, never from
  hand-copied text. A row with a `source` field was not measured by the run that wrote the file
  (an earlier run whose JSON was not kept); such rows are marked with a dagger and footnoted.
- `<!-- config: mmalign/methods/raft.py:RAFTConfig -->`: the keys of a config dataclass (type,
  default, the comment next to the field, and the checks its `validate()` makes), read from the
  source with `ast` so that the docs build needs no torch.
- `<!-- docstring: mmalign/methods/raft.py -->`: a module's docstring (a method's objective and
  reference as the code states them), as a text block.

Wired in through `hooks:` in mkdocs.yml; `scripts/build_docs.sh` builds with `--strict`.
`python scripts/docs_hooks.py --readme` rewrites the README's headline results block from the
same JSON (`--check` only reports whether it is stale; tests/integration/test_docs.py runs it).
"""

from __future__ import annotations

import ast
import io
import json
import re
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PLACEHOLDER = re.compile(r"^<!-- (results|config|docstring): (\S+)((?: \S+=\S+)*) -->$", re.M)
DAGGER = "†"


def _fmt(v, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _source_note(rows: list[dict]) -> str:
    """A footnote for the rows with a `source`: what they are, then the commands that re-measure them."""
    notes: dict[str, list[str]] = {}
    for r in rows:
        if r.get("source"):
            what, _, cmd = r["source"].partition("; rerun: ")
            notes.setdefault(what, []).append(cmd)
    out = ""
    for what, cmds in notes.items():
        out += f"\n\n{DAGGER} {what[0].upper() + what[1:]}; not re-measured with the current code. Rerun:\n"
        out += "".join(f"\n- `{c}`" for c in dict.fromkeys(cmds) if c)
    return out


def _mark(row: dict) -> str:
    return DAGGER if row.get("source") else ""


def _load(name: str, page: str):
    path = RESULTS / f"{name}.json"
    if not path.is_file():
        raise ValueError(f"{page}: results placeholder names {path.relative_to(ROOT)}, which does not exist")
    return json.loads(path.read_text())


def render_toy_alignment(data: list[dict], filters: dict[str, str]) -> str:
    """One row per (config, seed, overrides): held-out gold, proxy and diversity before -> after."""
    rows = [r for r in data if all(str(r.get(k)) == v for k, v in filters.items())]
    if not rows:
        return "(no rows in benchmarks/results/toy_alignment.json for this selection yet)"
    lines = [
        "| method | config | generator | seed | steps | held-out gold | proxy | diversity | samples | wall |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        config = f"`{Path(r['config']).name}`" + (f" + `{' '.join(r['overrides'])}`" if r.get("overrides") else "")
        wall = "-" if r.get("wall_s") is None else f"{r['wall_s'] / 60:.0f} min"
        lines.append(
            f"| {r.get('label', r['method'])}{_mark(r)} | {config} | {r['generator']} | {r['seed']} | {r['steps']} "
            f"| {_fmt(r['gold_before'])} → {_fmt(r['gold_after'])} | {_fmt(r.get('proxy_before'))} → "
            f"{_fmt(r.get('proxy_after'))} | {_fmt(r.get('div_before'))} → {_fmt(r.get('div_after'))} "
            f"| {_fmt(r.get('samples_generated'))} | {wall} |"
        )
    return "\n".join(lines) + _source_note(rows)


def render_toy_vlm(data: dict, filters: dict[str, str]) -> str:
    """Held-out hallucination rate per question type, base -> after, one row per VLM config."""
    types = [t for t in ("color", "count", "exist", "describe", "overall") if t in data["before"]]
    rows = [r for r in data["rows"] if all(str(r.get(k)) == v for k, v in filters.items())]
    lines = ["| config | loss | steps | " + " | ".join(types) + " |", "|---" * (len(types) + 3) + "|"]
    for r in rows:
        cells = " | ".join(f"{_fmt(data['before'].get(t))} → {_fmt(r['after'].get(t))}" for t in types)
        lines.append(
            f"| `{Path(r['config']).name}`{_mark(r) or _mark(data)} | {r['loss_type']} | {r['steps']} | {cells} |"
        )
    n = data["before"].get("n")
    head = (
        f"Held-out questions: {n} on {data.get('heldout_scenes')} held-out scenes; '-' = not recorded.\n\n" if n else ""
    )
    return head + "\n".join(lines) + _source_note(rows + [data])


def render_toy_guidance(data: dict, filters: dict[str, str]) -> str:
    """Inference-time alignment: gold accuracy, difference to the best static CFG scale, proxy, cost."""
    rows = data.get("summary") or _guidance_summary(data)
    lines = ["| method | gold | Δ vs best static (s.e.) | proxy | cost vs CFG 4 |", "|---|---|---|---|---|"]
    for r in rows:
        delta = "-" if r.get("delta") is None else f"{r['delta']:+.3f} ({r['se']:.3f})"
        lines.append(
            f"| {r['method']}{_mark(data)} | {_fmt(r['gold'])} | {delta} | {_fmt(r['proxy'])} | {r['cost_pct']:+.0f}% |"
        )
    return "\n".join(lines) + _source_note([data])


def _guidance_summary(data: dict) -> list[dict]:
    """The summary rows of benchmarks/toy_guidance.py's per-sample output."""
    rows = data["rows"]
    mean = lambda v: sum(v) / len(v)
    cfg_rows = [r for r in rows.values() if r["kind"] == "cfg"]
    best = max(cfg_rows, key=lambda r: (r["gold_acc"], sum(r["gold_frac"])))
    ref = next((r for r in cfg_rows if r["scale"] == data["config"]["ref_scale"]), best)
    out = []
    for r in rows.values():
        d = [a - b for a, b in zip(r["gold_correct"], best["gold_correct"])]
        m = mean(d)
        se = (sum((x - m) ** 2 for x in d) / (len(d) - 1) / len(d)) ** 0.5
        out.append(
            {
                "method": r["method"],
                "gold": r["gold_acc"],
                "delta": None if r is best else m,
                "se": se,
                "proxy": mean(r["proxy"]),
                "cost_pct": (r["seconds"] / ref["seconds"] - 1) * 100,
            }
        )
    return out


def render_video_step(data: dict, filters: dict[str, str]) -> str:
    """benchmarks/video_step.py: a Wan LoRA training step with and without gradient checkpointing."""
    s = data["settings"]
    head = (
        f"Device: {data['device']} ({s['device']}, {s.get('torch_threads')} thread(s)); model `{s['pretrained']}`; "
        f"batch {s['batch']} x {s['num_frames']} frames at {s['height']} x {s['width']}; LoRA rank {s['rank']}.\n\n"
    )
    lines = [
        "| gradient checkpointing | latents (C, F, h, w) | s / step | frames / s | peak memory |",
        "|---|---|---|---|---|",
    ]
    for r in data["rows"]:
        lines.append(
            f"| {'on' if r['gradient_checkpointing'] else 'off'} | {tuple(r['latent_shape'])} "
            f"| {r['s_per_step']:.3f} | {r['frames_per_s']:.1f} | {r['peak_mem_mb']:.0f} MB |"
        )
    return head + "\n".join(lines)


def render_toy_audio_gold(data: dict, filters: dict[str, str]) -> str:
    """benchmarks/toy_audio_gold.py: the audio world's gold evaluator on its renders, and the
    distribution rewards on the beep-band embedding."""
    s = data["settings"]
    out = [
        f"{s['captions']} captions; {s['seeds']} clean renders per caption, {s['robust_seeds']} per caption "
        "for each other setting.\n",
        "| clips | n | gold accuracy |",
        "|---|---|---|",
    ]
    out += [f"| {r['setting']} | {r['clips']} | {r['accuracy']:.3f} |" for r in data["gold"]]
    out += ["", "| hard-negative caption | pairs | rejected by gold |", "|---|---|---|"]
    out += [f"| {r['perturbation']} | {r['pairs']} | {r['rejected']:.3f} |" for r in data["negatives"]]
    out += ["", "| distribution reward (beep-band embedding) | value |", "|---|---|"]
    out += [f"| {r['measure']} | {r['value']:.3f} |" for r in data["distribution"]]
    return "\n".join(out)


def render_toy_video(data: dict, filters: dict[str, str]) -> str:
    """`python -m mmalign.toy.video_train report --json benchmarks/results/toy_video.json`: the
    shipped wan_toy's held-out gold (WanPipeline samples) and the video proxy's accuracy."""
    s, w, t = data["settings"], data["wan_toy"], data["train_info"]
    out = [
        f"{s['captions']} held-out captions x {len(s['seeds'])} seeds, {s['steps']} UniPC steps, guidance "
        f"{s['guidance_scale']}; transformer trained {t['steps']} steps"
        + (" (continuing an earlier run; see the rebuild commands).\n" if t.get("init_from") else ".\n"),
        "| measure | value |",
        "|---|---|",
        f"| gold accuracy (strict) | {w['accuracy']:.3f} |",
    ]
    out += [f"| kind `{k}` (n={w['n_per_kind'][k]}) | {v:.3f} |" for k, v in w["per_kind"].items()]
    out += [f"| constraint `{k}` | {v:.3f} |" for k, v in w["per_constraint"].items()]
    out += [
        f"| frames with every named object found | {w['frames_found']:.3f} |",
        f"| temporal similarity (1 - MSE of consecutive frames) | {w['temporal_similarity']:.3f} |",
    ]
    if "proxy" in data:
        p = data["proxy"]
        out += ["", "| toy_video_proxy | value |", "|---|---|"]
        out += [
            f"| held-out pairwise accuracy, `{k}` negatives | {v:.3f} |"
            for k, v in p["heldout_pairwise_accuracy"].items()
        ]
        out += [
            "| agreement with gold on the samples above: AUC of correct vs. incorrect "
            f"| {p['gold_agreement_auc']:.3f} |",
            "| agreement with gold on the samples above: pairs ordered as the fraction of constraints met "
            f"| {p['gold_fraction_concordance']:.3f} |",
        ]
    return "\n".join(out)


RENDERERS = {
    "toy_alignment": render_toy_alignment,
    "toy_audio_gold": render_toy_audio_gold,
    "toy_video": render_toy_video,
    "toy_vlm": render_toy_vlm,
    "toy_guidance": render_toy_guidance,
    "video_step": render_video_step,
}


def _comments(src: str) -> dict[int, str]:
    """Line number -> the text of the comment on that line."""
    out = {}
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.COMMENT:
            out[tok.start[0]] = tok.string.lstrip("#").strip()
    return out


def _checks(cls: ast.ClassDef) -> dict[str, list[str]]:
    """Field name -> the messages of `validate()` that start with `name:`."""
    out: dict[str, list[str]] = {}
    for node in cls.body:
        if isinstance(node, ast.FunctionDef) and node.name == "validate":
            parts = {id(v) for s in ast.walk(node) if isinstance(s, ast.JoinedStr) for v in s.values}
            for s in ast.walk(node):
                text = s.value if isinstance(s, ast.Constant) and isinstance(s.value, str) else None
                if isinstance(s, ast.JoinedStr):
                    text = "".join(v.value if isinstance(v, ast.Constant) else "…" for v in s.values)
                if text and ":" in text and id(s) not in parts:
                    key, msg = text.split(":", 1)
                    msg = msg.split(", got")[0].strip().rstrip(".")
                    if msg.strip(" .…") and msg not in out.get(key.strip(), []):
                        out.setdefault(key.strip(), []).append(msg)
    return out


def _num_field(src: str, value: ast.expr | None) -> tuple[str | None, str]:
    """(default, bounds) of a `num(DEFAULT, ge=.., ...)` field (mmalign.config.num); (None, "") otherwise."""
    if not (isinstance(value, ast.Call) and getattr(value.func, "id", "") == "num"):
        return None, ""
    ops = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
    default = ast.get_source_segment(src, value.args[0]) if value.args else None
    bounds = []
    for kw in value.keywords:
        if kw.arg == "default_factory":
            default = ast.get_source_segment(src, kw.value).removeprefix("lambda: ")
        elif kw.arg in ops:
            bounds.append(f"{ops[kw.arg]} {ast.get_source_segment(src, kw.value)}")
        elif kw.arg == "default":
            default = ast.get_source_segment(src, kw.value)
    return default, " and ".join(bounds) if bounds else "a finite number"


def render_config(spec: str, page: str) -> str:
    """The fields of `path.py:ClassName` as a table: key, type, default, notes and checks."""
    path, _, name = spec.partition(":")
    src = (ROOT / path).read_text()
    tree = ast.parse(src)
    cls = next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name), None)
    if cls is None:
        raise ValueError(f"{page}: config placeholder names {spec}, which does not exist")
    comments, checks = _comments(src), _checks(cls)
    lines = ["| key | type | default | notes |", "|---|---|---|---|"]
    for node in cls.body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        key = node.target.id
        default, bounds = _num_field(src, node.value)
        default = (
            default
            if default is not None
            else (ast.get_source_segment(src, node.value) if node.value is not None else "required")
        )
        default = re.sub(r"^field\(default_factory=lambda: (.*)\)$", r"\1", default or "")
        default = re.sub(r"^field\(default_factory=(\w+)\)$", r"\1()", default)
        above, ln = [], node.lineno - 1
        while ln in comments and src.splitlines()[ln - 1].lstrip().startswith("#"):
            above.insert(0, comments[ln])
            ln -= 1
        notes = " ".join(above + [comments.get(node.lineno, "")]).strip()
        notes += f" Checked at load: {bounds}." if bounds else ""
        notes += "".join(f" Checked: {c}." for c in checks.get(key, []))
        cell = lambda s: s.replace("|", "\\|").replace("\n", " ")
        lines.append(f"| `{key}` | `{cell(ast.unparse(node.annotation))}` | `{cell(default)}` | {cell(notes)} |")
    return "\n".join(lines)


def render_docstring(path: str, page: str) -> str:
    """The module docstring of `path` as a fenced text block."""
    file = ROOT / path
    if not file.is_file():
        raise ValueError(f"{page}: docstring placeholder names {path}, which does not exist")
    doc = ast.get_docstring(ast.parse(file.read_text()))
    if not doc:
        raise ValueError(f"{page}: {path} has no module docstring")
    return f"```text\n{doc}\n```"


def on_page_markdown(markdown: str, page, config, files) -> str:
    """MkDocs event: replace every placeholder in the page's markdown."""
    where = page.file.src_path

    def sub(m: re.Match) -> str:
        kind, name, args = m.group(1), m.group(2), m.group(3)
        if kind == "config":
            return render_config(name, where)
        if kind == "docstring":
            return render_docstring(name, where)
        if name not in RENDERERS:
            raise ValueError(f"{where}: no renderer for results {name!r} (known: {', '.join(RENDERERS)})")
        filters = dict(a.split("=", 1) for a in args.split())
        return RENDERERS[name](_load(name, where), filters)

    return PLACEHOLDER.sub(sub, markdown)


README = ROOT / "README.md"
README_BEGIN = "<!-- results: headline (generated by `python scripts/docs_hooks.py --readme`; do not edit) -->"
README_END = "<!-- end of generated results -->"


def render_headline(data: list[dict]) -> str:
    """One row per shipped toy config (no overrides): held-out gold before -> after for each seed."""
    groups: dict[str, list[dict]] = {}
    for r in data:
        if not r.get("overrides"):
            groups.setdefault(r["config"], []).append(r)
    lines = [
        "| method | config | generator | steps | held-out gold before → after (run seeds) |",
        "|---|---|---|---|---|",
    ]
    for config, rows in groups.items():
        rows = sorted(rows, key=lambda r: r["seed"])
        after = " / ".join(_fmt(r["gold_after"]) + _mark(r) for r in rows)
        seeds = " / ".join(str(r["seed"]) for r in rows)
        r0 = rows[0]
        lines.append(
            f"| {r0['method']} | `{config}` | {r0['generator']} | {r0['steps']} "
            f"| {_fmt(r0['gold_before'])} → {after} ({seeds}) |"
        )
    note = (
        f"\n\n{DAGGER} from an earlier run of the same benchmark (its JSON was not kept); see the results page."
        if any(r.get("source") for r in data)
        else ""
    )
    return "\n".join(lines) + note


def readme_block() -> str:
    """The generated block, markers included."""
    return f"{README_BEGIN}\n{render_headline(_load('toy_alignment', 'README.md'))}\n{README_END}"


def update_readme(check: bool = False) -> bool:
    """Rewrite (or with `check`, only compare) the README's generated block; True if it was up to date."""
    text = README.read_text()
    if README_BEGIN not in text or README_END not in text:
        raise SystemExit(f"README.md: the generated results block ({README_BEGIN}) is missing")
    head, rest = text.split(README_BEGIN, 1)
    tail = rest.split(README_END, 1)[1]
    new = head + readme_block() + tail
    if new == text:
        return True
    if not check:
        README.write_text(new)
    return False


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="Rewrite the README's results block from benchmarks/results/.")
    ap.add_argument("--readme", action="store_true", required=True)
    ap.add_argument("--check", action="store_true", help="only report whether the block is stale (exit 1 if so)")
    args = ap.parse_args()
    ok = update_readme(check=args.check)
    if args.check and not ok:
        raise SystemExit("README.md: the results block is stale; run python scripts/docs_hooks.py --readme")
