"""Experiment trackers through accelerate's tracking API (`train.report_to`).

    train:
      report_to: [tensorboard, wandb, trackio, mlflow]   # any subset; [] (the default) = metrics.jsonl only

The trainer builds its Accelerator with `accelerator_kwargs` (accelerate's `log_with`), calls
`start` once (accelerate's `init_trackers` with the resolved config, flattened), `log` with every
record it writes to metrics.jsonl (so the trackers' scalars are metrics.jsonl's numbers, at the
same steps), `log_image` with every evaluation grid, and `Accelerator.end_training` at the end.

Offline by default: nothing leaves the machine unless the user asks. TensorBoard writes to
RUN/trackers/<run name>/; W&B runs in offline mode in RUN/trackers/wandb/ (`wandb sync` uploads
it later; WANDB_MODE=online logs live); MLflow to the SQLite store RUN/trackers/mlflow.db and
RUN/trackers/mlflow-artifacts/ (unless MLFLOW_TRACKING_URI is set); trackio to its local
database (its default directory, or TRACKIO_DIR), as it does without a Space.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

TRACKERS = ("tensorboard", "wandb", "trackio", "mlflow")
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio", "mlflow": "mlflow"}


def check_report_to(names: list[str]) -> None:
    """ValueError naming an unknown tracker, a repeated one, or a tracker whose package is missing."""
    for name in names:
        if name not in TRACKERS:
            raise ValueError(f"report_to: unknown tracker {name!r}; expected some of {', '.join(TRACKERS)}")
        if importlib.util.find_spec(PACKAGES[name]) is None:
            raise ValueError(
                f"report_to: {name} needs the package {PACKAGES[name]!r}, which is not installed "
                f"(pip install {PACKAGES[name]}, or pip install 'mmalign[trackers]')"
            )
    if len(set(names)) != len(names):
        raise ValueError(f"report_to: a tracker is named twice in {names}")


def tracker_dir(run_dir: str | Path) -> Path:
    """Where the trackers write inside a run directory."""
    return Path(run_dir) / "trackers"


def accelerator_kwargs(report_to: list[str], run_dir: str | Path) -> dict[str, Any]:
    """Keyword arguments for `Accelerator(...)`: `log_with` and the trackers' directory ({} for none)."""
    if not report_to:
        return {}
    return {"log_with": list(report_to), "project_dir": str(tracker_dir(run_dir))}


def flat_config(config: dict[str, Any], prefix: str = "") -> dict[str, bool | int | float | str]:
    """{"train.lr": 1e-5, ...}: nested sections joined by dots; lists and None as text (what
    TensorBoard's hparams and MLflow's params accept)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_config(value, f"{name}."))
        elif isinstance(value, (bool, int, float, str)):
            out[name] = value
        else:
            out[name] = str(value)
    return out


def start(accelerator, config: dict[str, Any], run_name: str, run_dir: str | Path) -> None:
    """Start the trackers of `accelerator` (if any) with the resolved config, offline unless the
    environment says otherwise (WANDB_MODE, MLFLOW_TRACKING_URI)."""
    if not accelerator.log_with:
        return
    root = tracker_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    names = {str(getattr(t, "value", t)) for t in accelerator.log_with}
    if "mlflow" in names and "MLFLOW_TRACKING_URI" not in os.environ:
        import mlflow  # deferred: the optional tracker's package

        mlflow.set_tracking_uri(f"sqlite:///{(root / 'mlflow.db').resolve()}")  # MLflow's local store
    init_kwargs = {
        "wandb": {"name": run_name, "dir": str(root), "mode": os.environ.get("WANDB_MODE", "offline")},
        "mlflow": {"logging_dir": (root / "mlflow-artifacts").resolve().as_uri()},
    }  # not ./mlruns
    accelerator.init_trackers(run_name, config=flat_config(config), init_kwargs=init_kwargs)


def scalars(record: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The numbers of a metrics.jsonl record as trackers take them: nested ones joined by "/"
    (an evaluation's reward is eval/reward); `step`, text and flags are left out."""
    out: dict[str, float] = {}
    for key, value in record.items():
        if isinstance(value, dict):
            out.update(scalars(value, f"{prefix}{key}/"))
        elif (prefix or key != "step") and isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"{prefix}{key}"] = float(value)
    return out


def log(accelerator, record: dict[str, Any], step: int) -> None:
    """Log a metrics.jsonl record to every tracker, at its own step (or `step` when it has none)."""
    if accelerator.trackers:
        values = scalars(record)
        if values:
            accelerator.log(values, step=int(record.get("step", step)))


def log_image(accelerator, tag: str, image, step: int) -> None:
    """Log a PIL image (an evaluation grid) to every tracker that takes images."""
    import numpy as np

    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({tag: np.asarray(image.convert("RGB"))[None]}, step=step, dataformats="NHWC")
        elif tracker.name == "wandb":
            tracker.log_images({tag: [image]}, step=step)
        elif tracker.name == "trackio":
            import trackio  # deferred: the optional tracker's package

            tracker.log({tag: trackio.Image(image)}, step=step)
        elif tracker.name == "mlflow":
            import mlflow  # deferred: the optional tracker's package

            mlflow.log_image(image, artifact_file=f"{tag}/step_{step:07d}.png")
