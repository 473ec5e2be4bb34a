"""`mmalign report RUN [RUN ...]`: one self-contained HTML page to judge runs by looking.

The page (every image embedded, nothing fetched) shows, for one run or several overlaid:

    curves        held-out proxy reward, gold accuracy, diversity, training reward, KL and loss
                  over steps (matplotlib, drawn as inline SVG), one line per run
    sample grids  the evaluation grids (RUN/samples/step_*.png) with a step slider per run
    before/after  per evaluation prompt, its first image at the first and at the last evaluation
    training data the pairs or rollouts the method trained on, with their rewards or labels:
                  preference manifests (data.path), labelled D3PO rounds (method.buffer/labels),
                  saved rollouts (RUN/rollouts/round_*/rollout.jsonl)
    config        each run's resolved config.yaml, summary.json, and the report's environment

Input is what the trainer writes (see mmalign/trainer.py): config.yaml, metrics.jsonl,
samples/step_*.png, summary.json, rollouts/. matplotlib is the `report` extra.
"""

from __future__ import annotations

import base64
import io
import json
import os
import platform
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

MAX_PAIRS = 24  # training pairs / rollout samples shown per run
THUMB = 160  # pixels, the longer side of a thumbnail of training data
# (title, where the values come from, the key or a regex over the keys)
CURVES = [
    ("Proxy reward (held-out evaluation)", "eval", "reward"),
    ("Gold accuracy (held-out evaluation)", "eval", "gold_accuracy"),
    ("Diversity (held-out evaluation)", "eval", "diversity"),
    ("Training reward (rollouts)", "train", "rollout/reward_mean"),
    ("KL", "train", re.compile(r"(^|[/_])kl($|[/_])")),
    ("Loss", "train", "loss"),
]


class ReportError(ValueError):
    """Bad input to a report (not a run directory): one line naming it."""


@dataclass
class Run:
    """A run directory, read."""

    path: Path
    name: str
    config: dict[str, Any]
    train: list[dict[str, Any]] = field(default_factory=list)  # metrics.jsonl rows with training metrics
    evals: list[dict[str, Any]] = field(default_factory=list)  # rows {"step", "tag", "eval": {...}}
    grids: list[tuple[int, Path]] = field(default_factory=list)  # (step, samples/step_*.png)
    summary: dict[str, Any] = field(default_factory=dict)


def read_run(path: str | Path) -> Run:
    """Read config.yaml, metrics.jsonl, samples/ and summary.json of a run directory."""
    p = Path(path)
    if not (p / "config.yaml").is_file() or not (p / "metrics.jsonl").is_file():
        raise ReportError(
            f"{p}: not a run directory (no config.yaml and metrics.jsonl); give the --output-dir of `mmalign train`"
        )
    config = yaml.safe_load((p / "config.yaml").read_text()) or {}
    run = Run(p, p.name, config)
    for line in (p / "metrics.jsonl").read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line cut short by a killed run
        if not isinstance(row, dict) or "step" not in row:
            continue
        (run.evals if isinstance(row.get("eval"), dict) else run.train).append(row)
    for png in sorted((p / "samples").glob("step_*.png")):
        m = re.fullmatch(r"step_(\d+)", png.stem)
        if m:
            run.grids.append((int(m.group(1)), png))
    try:
        run.summary = json.loads((p / "summary.json").read_text())
    except (OSError, ValueError):
        pass
    return run


def unique_names(runs: list[Run]) -> None:
    """Name each run by its directory, adding parent folders where two runs share a name."""
    for depth in range(1, 6):
        names = ["/".join(r.path.resolve().parts[-depth:]) for r in runs]
        if len(set(names)) == len(names):
            break
    for r, n in zip(runs, names):
        r.name = n


# --------------------------------------------------------------------------- curves
def curve_points(run: Run, source: str, key: str | re.Pattern) -> dict[str, tuple[list[int], list[float]]]:
    """{metric name: (steps, values)} of the rows of `source` ("eval" or "train") matching `key`."""
    rows = [(r["step"], r["eval"]) for r in run.evals] if source == "eval" else [(r["step"], r) for r in run.train]
    out: dict[str, tuple[list[int], list[float]]] = {}
    for step, values in rows:
        for k, v in values.items():
            hit = k == key if isinstance(key, str) else bool(key.search(k))
            if hit and isinstance(v, (int, float)) and not isinstance(v, bool):
                xs, ys = out.setdefault(k, ([], []))
                xs.append(step)
                ys.append(float(v))
    return out


def plot_curves(runs: list[Run]) -> list[tuple[str, str]]:
    """[(title, inline SVG)] of every curve some run has; the runs overlaid in one plot each."""
    import matplotlib  # deferred: the `report` extra

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams["svg.fonttype"] = "none"  # text as text: smaller, selectable
    out = []
    for title, source, key in CURVES:
        series = [(run, name, pts) for run in runs for name, pts in curve_points(run, source, key).items()]
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(5.2, 3.2))
        for run, name, (xs, ys) in series:
            label = run.name if isinstance(key, str) else f"{run.name}: {name}"
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=label)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(series) > 1 or len(runs) > 1:
            ax.legend(fontsize=7)
        fig.tight_layout()
        buf = io.StringIO()
        fig.savefig(buf, format="svg")
        plt.close(fig)
        svg = buf.getvalue()
        out.append((title, svg[svg.index("<svg") :]))  # drop the XML prolog: the SVG sits inside HTML
    return out


# --------------------------------------------------------------------------- images
def data_uri(path: Path, max_side: int | None = None) -> str:
    """A PNG file (shrunk to `max_side` pixels if given) as a data: URI."""
    from PIL import Image

    if max_side is None:
        return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
    with Image.open(path) as im:
        im = im.convert("RGB")
        im.thumbnail((max_side, max_side))
        buf = io.BytesIO()
        im.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def eval_prompts(config: dict[str, Any]) -> list[str]:
    """The evaluation prompts of a run config (a prompt set is read through mmalign's sources)."""
    e = config.get("eval") or {}
    prompts = list(e.get("prompts") or [])
    if e.get("prompts_from"):
        try:
            from mmalign.data.generated import load_prompts

            prompts = load_prompts(e["prompts_from"])
        except Exception:  # a prompt set this installation does not have: number the prompts instead
            prompts = []
    return prompts[: e["max_prompts"]] if e.get("max_prompts") else prompts


def before_after(run: Run, limit: int = 8) -> list[tuple[str, str, str]]:
    """[(prompt, first-eval image, last-eval image)]: each prompt's first image, cut from the grids.

    The trainer's grid (mmalign.media.image_grid) puts the first 64 samples, prompt by prompt
    (eval.images_per_prompt each), min(8 x images_per_prompt, 16) per row, 2 pixels apart.
    """
    from PIL import Image

    if len(run.grids) < 2 or not run.evals:
        return []
    per_prompt = int((run.config.get("eval") or {}).get("images_per_prompt") or 1)
    n = min(64, int(run.evals[-1]["eval"].get("n_samples") or 0))
    if n <= 0:
        return []
    cols = min(8 * per_prompt, 16, n)
    prompts = eval_prompts(run.config)
    out = []
    with Image.open(run.grids[0][1]) as first, Image.open(run.grids[-1][1]) as last:
        side, rest = divmod(first.width - 2, cols)
        if rest or first.size != last.size:
            return []
        for p in range(min(limit, -(-n // per_prompt))):
            i = p * per_prompt
            x, y = 2 + (i % cols) * side, 2 + (i // cols) * side
            box = (x, y, x + side - 2, y + side - 2)
            label = prompts[p] if p < len(prompts) else f"prompt {p + 1}"
            out.append((label, _crop_uri(first, box), _crop_uri(last, box)))
    return out


def _crop_uri(im, box) -> str:
    buf = io.BytesIO()
    im.crop(box).convert("RGB").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def training_items(run: Run) -> tuple[str, list[dict[str, Any]]]:
    """(what they are, [{"prompt", "images": [(uri, caption)]}]) of the data the method trained on."""
    method = run.config.get("method") or {}
    data = run.config.get("data") or {}
    if method.get("labels") and method.get("buffer"):
        return "Labelled pairs (D3PO, human labels; the preferred image is marked)", _labelled(
            Path(method["buffer"]), Path(method["labels"])
        )
    rounds = sorted((run.path / "rollouts").glob("round_*/rollout.jsonl"))
    if rounds:
        return f"Rollouts of {rounds[-1].parent.name} (the last saved round) with their rewards", _rollout(rounds[-1])
    if data.get("kind") == "manifest" and data.get("path") and Path(data["path"]).is_file():
        return "Preference pairs (chosen, rejected) from " + str(data["path"]), _manifest(Path(data["path"]))
    return "", []


def _jsonl(path: Path) -> list[dict]:
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _image(path: Path, caption: str) -> tuple[str, str] | None:
    return (data_uri(path, THUMB), caption) if path.is_file() else None


def _labelled(buffer: Path, labels: Path) -> list[dict[str, Any]]:
    items = []
    for row in _jsonl(labels)[:MAX_PAIRS] if labels.is_file() else []:
        choice, images = row.get("choice"), []
        for k, sid in enumerate(row.get("sample_ids") or []):
            mark = "tie" if row.get("tie") else ("preferred" if choice == k else "")
            img = _image(buffer / "images" / f"{int(sid):05d}.png", mark)
            if img:
                images.append(img)
        items.append({"prompt": row.get("prompt", ""), "images": images})
    return items


def _rollout(jsonl: Path) -> list[dict[str, Any]]:
    groups: dict[str, list] = {}
    for row in _jsonl(jsonl)[:MAX_PAIRS]:
        reward = row.get("reward")
        img = _image(jsonl.parent / str(row.get("image", "")), f"reward {reward:.4g}" if reward is not None else "")
        if img:
            groups.setdefault(str(row.get("prompt", "")), []).append(img)
    return [{"prompt": p, "images": imgs} for p, imgs in groups.items()]


def _manifest(path: Path) -> list[dict[str, Any]]:
    items = []
    for row in _jsonl(path)[:MAX_PAIRS]:
        images = [
            img
            for key in ("chosen", "rejected")
            if isinstance(row.get(key), str) and (img := _image(path.parent / row[key], key))
        ]
        items.append({"prompt": row.get("prompt", ""), "images": images})
    return items


# --------------------------------------------------------------------------- environment
def environment() -> dict[str, str]:
    """Versions of Python, the platform and the main libraries, as the report sees them."""
    from importlib import metadata

    env = {"python": sys.version.split()[0], "platform": platform.platform()}
    for pkg in ("mmalign", "torch", "diffusers", "transformers", "accelerate", "peft"):
        try:
            env[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return env


# --------------------------------------------------------------------------- the page
def build_report(run_dirs: list[str | Path], out: str | Path) -> Path:
    """Write the HTML report of `run_dirs` to `out` (atomically) and return its path."""
    runs = [read_run(p) for p in run_dirs]
    if not runs:
        raise ReportError("give at least one run directory")
    unique_names(runs)
    page = render(runs)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(page)
    os.replace(tmp, out)
    return out


def render(runs: list[Run]) -> str:
    """The page's HTML (jinja2 template below, autoescaped; the SVGs are matplotlib's own output)."""
    import jinja2  # deferred: the `report` extra
    from markupsafe import Markup

    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    per_run = []
    for i, run in enumerate(runs):
        what, items = training_items(run)
        per_run.append(
            {
                "i": i,
                "name": run.name,
                "grids": [(s, data_uri(p)) for s, p in run.grids],
                "before_after": before_after(run),
                "training_title": what,
                "training": items,
                "config": yaml.safe_dump(run.config, sort_keys=False),
                "summary": json.dumps(run.summary, indent=2) if run.summary else "",
                "final_eval": {
                    k: v
                    for k, v in (run.evals[-1]["eval"] if run.evals else {}).items()
                    if isinstance(v, (int, float)) and not isinstance(v, bool)
                },
                "steps": run.summary.get("steps", (run.train[-1]["step"] if run.train else 0)),
                "method": (run.config.get("method") or {}).get("name", "?"),
            }
        )
    curves = [(t, Markup(svg)) for t, svg in plot_curves(runs)]
    return env.from_string(TEMPLATE).render(
        title="mmalign report: " + ", ".join(r.name for r in runs),
        runs=per_run,
        curves=curves,
        environment=environment(),
        script=Markup(SCRIPT),
        style=Markup(STYLE),
    )


STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.4em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 1.6em; }
.curves { display: flex; flex-wrap: wrap; gap: 1em; } .curve svg { width: 520px; height: auto; }
.grid img { width: 100%; max-width: 768px; image-rendering: pixelated; border: 1px solid #ddd; }
.pairs { display: flex; flex-wrap: wrap; gap: 1em; }
.pair { border: 1px solid #ddd; padding: .4em; max-width: 360px; }
.pair img { width: 128px; image-rendering: pixelated; display: block; }
.pair figure { display: inline-block; margin: .2em; text-align: center; font-size: .8em; }
.preferred img { outline: 3px solid #2a2; } pre { background: #f6f6f6; padding: .6em; overflow: auto; }
table { border-collapse: collapse; } td, th { border: 1px solid #ccc; padding: .2em .6em; text-align: left; }
"""

SCRIPT = """
document.querySelectorAll('input.step-slider').forEach(function (slider) {
  var frames = JSON.parse(document.getElementById(slider.dataset.frames).textContent);
  var img = document.getElementById(slider.dataset.img);
  var label = document.getElementById(slider.dataset.label);
  function show() {
    var f = frames[Number(slider.value)];
    img.src = f[1];
    label.textContent = 'step ' + f[0];
  }
  slider.addEventListener('input', show);
  show();
});
"""

TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{{ title }}</title>
<link rel="icon" href="data:,"><style>{{ style }}</style></head>
<body>
<h1>{{ title }}</h1>
<table><tr><th>run</th><th>method</th><th>steps</th><th>final evaluation</th></tr>
{% for r in runs %}<tr><td>{{ r.name }}</td><td>{{ r.method }}</td><td>{{ r.steps }}</td>
<td>{% for k, v in r.final_eval.items() %}{{ k }} {{ '%.4g' % v }}{% if not loop.last %}, {% endif %}
{% endfor %}</td></tr>
{% endfor %}</table>

<h2 id="curves">Curves</h2>
<div class="curves">{% for title, svg in curves %}
<div class="curve" data-title="{{ title }}">{{ svg }}</div>{% else %}<p>No metrics logged yet.</p>{% endfor %}</div>

{% for r in runs %}
<h2 id="run-{{ r.i }}">{{ r.name }}</h2>
<h3>Evaluation samples</h3>
{% if r.grids %}
<script type="application/json" id="frames-{{ r.i }}">{{ r.grids | tojson }}</script>
<label>step <input type="range" class="step-slider" id="slider-{{ r.i }}" min="0" max="{{ r.grids | length - 1 }}"
  value="{{ r.grids | length - 1 }}" data-frames="frames-{{ r.i }}" data-img="grid-{{ r.i }}"
  data-label="step-{{ r.i }}">
</label> <span id="step-{{ r.i }}"></span>
<div class="grid"><img id="grid-{{ r.i }}" alt="evaluation grid of {{ r.name }}"></div>
{% else %}<p>No evaluation grids (samples/step_*.png).</p>{% endif %}

{% if r.before_after %}<h3>Before / after, per prompt</h3><div class="pairs">
{% for prompt, a, b in r.before_after %}<div class="pair"><div>{{ prompt }}</div>
<figure><img src="{{ a }}" alt="before"><figcaption>first evaluation</figcaption></figure>
<figure><img src="{{ b }}" alt="after"><figcaption>last evaluation</figcaption></figure></div>
{% endfor %}</div>{% endif %}

{% if r.training %}<h3>{{ r.training_title }}</h3><div class="pairs">
{% for item in r.training %}<div class="pair"><div>{{ item.prompt }}</div>
{% for uri, caption in item.images %}<figure class="{{ caption }}"><img src="{{ uri }}" alt="{{ caption }}">
<figcaption>{{ caption }}</figcaption></figure>{% endfor %}</div>
{% endfor %}</div>{% endif %}

<h3>Config</h3><details><summary>config.yaml</summary><pre>{{ r.config }}</pre></details>
{% if r.summary %}<details><summary>summary.json</summary><pre>{{ r.summary }}</pre></details>{% endif %}
{% endfor %}

<h2>Environment (of this report)</h2>
<table>{% for k, v in environment.items() %}<tr><td>{{ k }}</td><td>{{ v }}</td></tr>{% endfor %}</table>
<script>{{ script }}</script>
</body></html>
"""
