"""What the report shows of a run's training data, read from files alone (no model, no browser)."""

import json

import pytest
import yaml
from PIL import Image

from mmalign.report import ReportError, build_report, read_run, training_items


def _run(tmp_path, config, rows):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "{cut sh")
    return run


def _png(path, color):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), color).save(path)


def test_rollouts_with_rewards_and_a_kl_curve(tmp_path):
    run = _run(
        tmp_path,
        {"method": {"name": "grpo"}},
        [
            {"step": 1, "loss": 0.1, "policy/kl": 0.01, "rollout/reward_mean": 0.2},
            {"step": 2, "loss": 0.2, "policy/kl": 0.02, "rollout/reward_mean": 0.3},
        ],
    )
    for rnd in (0, 1):
        d = run / "rollouts" / f"round_{rnd:06d}"
        rows = [
            {"sample_id": i, "prompt": "a red circle", "reward": 0.5 + i + rnd, "image": f"images/{i:05d}.png"}
            for i in range(2)
        ]
        (d / "images").mkdir(parents=True)
        (d / "rollout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        for i in range(2):
            _png(d / "images" / f"{i:05d}.png", (255, 0, 0))
    what, items = training_items(read_run(run))
    assert what.startswith("Rollouts of round_000001")
    assert [c for _, c in items[0]["images"]] == ["reward 1.5", "reward 2.5"]
    page = build_report([run], tmp_path / "r.html").read_text()
    assert "KL" in page and "Training reward (rollouts)" in page and "No evaluation grids" in page


def test_labelled_d3po_pairs_mark_the_preferred_sample(tmp_path):
    buffer = tmp_path / "round"
    for i in range(4):
        _png(buffer / "images" / f"{i:05d}.png", (40 * i, 0, 0))
    labels = buffer / "pairs.jsonl"
    labels.write_text(
        json.dumps({"prompt": "a", "sample_ids": [0, 1], "choice": 1, "tie": False})
        + "\n"
        + json.dumps({"prompt": "b", "sample_ids": [2, 3], "choice": None, "tie": True})
        + "\n"
    )
    run = _run(
        tmp_path, {"method": {"name": "d3po", "buffer": str(buffer), "labels": str(labels)}}, [{"step": 1, "loss": 0.6}]
    )
    what, items = training_items(read_run(run))
    assert what.startswith("Labelled pairs")
    assert [[c for _, c in it["images"]] for it in items] == [["", "preferred"], ["tie", "tie"]]


def test_not_a_run(tmp_path):
    with pytest.raises(ReportError, match="not a run directory"):
        read_run(tmp_path)
