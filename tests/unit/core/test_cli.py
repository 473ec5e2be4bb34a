"""CLI end to end: train a few steps, sample with the trained LoRA, score the samples."""

import json
import subprocess
import sys

from mmalign.cli import main
from tests.helpers import write_config


def test_train_sample_score(tmp_path, tiny_sd, tiny_clip, pairs_manifest, capsys):
    cfg = write_config(
        tmp_path / "c.yaml",
        tiny_sd,
        tiny_clip,
        pairs_manifest,
        eval={"enabled": True, "prompts": ["a red square"], "num_steps": 2},
    )
    run = tmp_path / "run"
    assert main(["train", str(cfg), "train.steps=2", "--output-dir", str(run), "--report"]) == 0
    out = capsys.readouterr().out
    assert "base (step 0) vs aligned (step 2)" in out and "proxy reward" in out
    for f in (
        "config.yaml",
        "metrics.jsonl",
        "summary.json",
        "final/pytorch_lora_weights.safetensors",
        "samples/step_0000000.png",
        "samples/step_0000002.png",
    ):
        assert (run / f).exists(), f

    samples = tmp_path / "samples"
    assert (
        main(
            [
                "sample",
                "--pretrained",
                str(tiny_sd),
                "--weights",
                str(run / "final"),
                "--prompt",
                "a red square",
                "--prompt",
                "a blue circle",
                "--n",
                "2",
                "--steps",
                "2",
                "--out",
                str(samples),
            ]
        )
        == 0
    )
    rows = [json.loads(l) for l in (samples / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and (samples / "grid.png").is_file()

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(r["prompt"] for r in rows) + "\n")
    scores = tmp_path / "scores.jsonl"
    assert (
        main(
            [
                "score",
                "--reward",
                "clip",
                "--reward-args",
                f"model=local-dir:{tiny_clip}",
                "--prompts",
                str(prompts),
                "--out",
                str(scores),
                *[r["path"] for r in rows],
            ]
        )
        == 0
    )
    scored = [json.loads(l) for l in scores.read_text().splitlines()]
    assert len(scored) == 4 and all(isinstance(s["score"], float) for s in scored)
    assert "mean" in capsys.readouterr().out

    # mmalign eval: base vs trained weights of the run, JSON + before/after grid
    assert (
        main(["eval", "--run", str(run), "--prompts-from", str(prompts), "--seeds", "2", "--steps", "2", "--no-gold"])
        == 0
    )
    res = json.loads((run / "eval" / "eval.json").read_text())
    assert {"base", "trained"} <= set(res) and "diversity" in res["trained"] and "reward" in res["base"]
    assert (run / "eval" / "before_after.png").is_file()


def test_bad_config_exits_with_a_message(tmp_path, tiny_sd, tiny_clip, pairs_manifest, capsys):
    cfg = write_config(tmp_path / "c.yaml", tiny_sd, tiny_clip, pairs_manifest)
    assert main(["train", str(cfg), "train.lr=fast"]) == 2
    assert "train.lr: expected a number, got 'fast'" in capsys.readouterr().err


def test_help_works():
    res = subprocess.run([sys.executable, "-m", "mmalign.cli", "train", "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "--resume" in res.stdout and "overrides" in res.stdout
