"""train.report_to: a real run's TensorBoard events and W&B offline run hold metrics.jsonl's numbers."""

import importlib.util
import json

import pytest

from mmalign import tracking
from tests.helpers import write_config
from tests.helpers.tracker_files import tensorboard_images, tensorboard_scalars, wandb_offline_run


def test_training_logs_metrics_grids_and_config_to_the_trackers(
    tmp_path, tiny_sd, tiny_clip, pairs_manifest, monkeypatch
):
    from mmalign.cli import main

    pytest.importorskip("tensorboard")
    names = ["tensorboard"] + (["wandb"] if importlib.util.find_spec("wandb") else [])
    monkeypatch.delenv("WANDB_MODE", raising=False)  # offline: the default
    cfg = write_config(
        tmp_path / "c.yaml",
        tiny_sd,
        tiny_clip,
        pairs_manifest,
        train={"steps": 3, "batch_size": 2, "lr": 1e-3, "report_to": names},
        eval={"enabled": True, "every": 2, "prompts": ["a red square"], "num_steps": 2},
    )
    run = tmp_path / "run"
    assert main(["train", str(cfg), "--output-dir", str(run)]) == 0
    want: dict[str, dict[int, float]] = {}
    for row in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()):
        for key, value in tracking.scalars(row).items():
            want.setdefault(key, {})[row.get("step", 0)] = value
    assert {"loss", "lr", "eval/reward", "data/pairs"} <= want.keys()
    tb = tensorboard_scalars(run / "trackers" / "test")
    assert tb.keys() == want.keys()
    for key, values in want.items():
        assert tb[key] == pytest.approx(values, rel=1e-6, abs=1e-12), key  # float32 in the event file
    assert tensorboard_images(run / "trackers" / "test") == {"eval/samples": [0, 2, 3]}
    if "wandb" in names:
        history, config, images = wandb_offline_run(run / "trackers" / "wandb")
        assert history == want and images == ["eval/samples"]
        assert config["train.lr"] == 1e-3 and config["method.name"] == "diffusion_dpo"


def test_unknown_tracker_is_one_line(tmp_path, tiny_sd, tiny_clip, pairs_manifest, capsys):
    from mmalign.cli import main

    cfg = write_config(tmp_path / "c.yaml", tiny_sd, tiny_clip, pairs_manifest, train={"report_to": ["neptune"]})
    assert main(["train", str(cfg), "--output-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "train.report_to: unknown tracker 'neptune'" in err
