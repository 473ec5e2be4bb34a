"""Trackers through accelerate: what mmalign.tracking logs is what TensorBoard's reader and a
W&B offline run directory give back."""

import pytest
from PIL import Image

from mmalign import tracking
from tests.helpers.tracker_files import tensorboard_images, tensorboard_scalars, wandb_offline_run

RECORDS = [
    {"data/pairs": 6},
    {"step": 0, "tag": "step_0", "eval": {"reward": 0.25, "n_samples": 4}},
    {"step": 1, "loss": 0.69, "lr": 1e-3, "implicit_acc": 0.5},
    {"step": 2, "loss": 0.61, "lr": 1e-3, "flag": True, "eval": {"reward": 0.3, "per_kind": {"circle": 0.5}}},
]


def test_scalars_and_flat_config():
    assert tracking.scalars(RECORDS[3]) == {"loss": 0.61, "lr": 1e-3, "eval/reward": 0.3, "eval/per_kind/circle": 0.5}
    assert tracking.flat_config({"train": {"lr": 1e-3, "betas": [0.9, 0.99]}, "reward": None}) == {
        "train.lr": 1e-3,
        "train.betas": "[0.9, 0.99]",
        "reward": "None",
    }


def test_report_to_is_checked():
    tracking.check_report_to(["tensorboard"])
    with pytest.raises(ValueError, match="unknown tracker 'neptune'"):
        tracking.check_report_to(["neptune"])
    with pytest.raises(ValueError, match="named twice"):
        tracking.check_report_to(["tensorboard", "tensorboard"])
    assert tracking.accelerator_kwargs([], "run") == {}


@pytest.mark.parametrize("names", [["tensorboard", "wandb"]])
def test_logged_scalars_images_and_config_read_back(tmp_path, monkeypatch, names):
    from accelerate import Accelerator

    for name in names:
        pytest.importorskip(tracking.PACKAGES[name])
    monkeypatch.delenv("WANDB_MODE", raising=False)
    acc = Accelerator(**tracking.accelerator_kwargs(names, tmp_path))
    tracking.start(acc, {"train": {"lr": 1e-3}, "method": {"name": "d3po"}}, "toy-run", tmp_path)
    for r in RECORDS:
        tracking.log(acc, r, step=0)
    tracking.log_image(acc, "eval/samples", Image.new("RGB", (8, 8), (200, 10, 10)), 2)
    acc.end_training()
    want = {
        "data/pairs": {0: 6.0},
        "eval/reward": {0: 0.25, 2: 0.3},
        "eval/n_samples": {0: 4.0},
        "loss": {1: 0.69, 2: 0.61},
        "lr": {1: 1e-3, 2: 1e-3},
        "implicit_acc": {1: 0.5},
        "eval/per_kind/circle": {2: 0.5},
    }
    tb = tensorboard_scalars(tmp_path / "trackers" / "toy-run")
    assert tb.keys() == want.keys()
    for tag, values in want.items():
        assert tb[tag] == pytest.approx(values), tag  # float32 in the event file
    assert tensorboard_images(tmp_path / "trackers" / "toy-run") == {"eval/samples": [2]}
    history, config, images = wandb_offline_run(tmp_path / "trackers" / "wandb")
    assert history == want and images == ["eval/samples"]
    assert config["train.lr"] == 1e-3 and config["method.name"] == "d3po"


READ_BACK = """
import json, sys
from accelerate import Accelerator
from PIL import Image
from mmalign import tracking
names, run = sys.argv[1].split(","), sys.argv[2]
acc = Accelerator(**tracking.accelerator_kwargs(names, run))
tracking.start(acc, {"train": {"lr": 1e-3}}, "toy-run", run)
tracking.log(acc, {"step": 1, "loss": 0.5, "lr": 1e-3}, 1)
tracking.log(acc, {"step": 2, "eval": {"reward": 0.3}}, 2)
tracking.log_image(acc, "eval/samples", Image.new("RGB", (8, 8), (200, 10, 10)), 2)
acc.end_training()
out = {}
if "mlflow" in names:
    from mlflow.tracking import MlflowClient
    c = MlflowClient()
    r = c.search_runs([c.get_experiment_by_name("toy-run").experiment_id])[0]
    out["mlflow"] = {k: {m.step: m.value for m in c.get_metric_history(r.info.run_id, k)} for k in r.data.metrics}
    out["mlflow_params"] = r.data.params
    out["mlflow_images"] = [a.path for a in c.list_artifacts(r.info.run_id, "eval/samples")]
if "trackio" in names:
    from trackio.sqlite_storage import SQLiteStorage as S
    logs = S.get_logs("toy-run", S.get_runs("toy-run")[0])
    out["trackio"] = {k: {row["step"]: v} for row in logs for k, v in row.items() if k not in ("step", "timestamp")}
print("RESULT" + json.dumps(out))
"""


def test_trackio_and_mlflow_read_back(tmp_path):
    """In a process of its own: trackio reads TRACKIO_DIR when it is imported."""
    import json
    import os
    import subprocess
    import sys

    names = [n for n in ("trackio", "mlflow") if __import__("importlib").util.find_spec(n)]
    if not names:
        pytest.skip("neither trackio nor mlflow is installed (pip install 'mmalign[trackers]')")
    env = {**os.environ, "TRACKIO_DIR": str(tmp_path / "trackio"), "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    (tmp_path / "cwd").mkdir()
    res = subprocess.run(
        [sys.executable, "-c", READ_BACK, ",".join(names), str(tmp_path / "run")],
        env=env,
        cwd=tmp_path / "cwd",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.split("RESULT")[-1].splitlines()[0])
    want = {"loss": {"1": 0.5}, "lr": {"1": 1e-3}, "eval/reward": {"2": 0.3}}
    if "mlflow" in names:
        assert out["mlflow"] == want and out["mlflow_params"] == {"train.lr": "0.001"}
        assert out["mlflow_images"] == ["eval/samples/step_0000002.png"]
        assert (tmp_path / "run" / "trackers" / "mlflow.db").is_file()  # local, in the run directory ...
        assert list((tmp_path / "run" / "trackers" / "mlflow-artifacts").glob("*/artifacts/eval/samples/*.png"))
        assert not (tmp_path / "cwd" / "mlruns").exists()  # ... not in the working directory
    if "trackio" in names:
        assert {k: v for k, v in out["trackio"].items() if k != "eval/samples"} == want
        assert out["trackio"]["eval/samples"]["2"]["_type"] == "trackio.image"
