"""A 2-process CPU run through `accelerate launch` (gloo) equals a 1-process run over the
same global batch: gradients are synchronised and the data is split, not duplicated."""

import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from mmalign import checkpoint as ckpt
from tests.helpers import write_config


def _run(cmd, env):
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


def test_two_processes_equal_one(tmp_path, tiny_sd, tiny_clip, pairs_manifest):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "1"}
    bin_dir = Path(sys.executable).parent
    p = write_config(
        tmp_path / "c.yaml",
        tiny_sd,
        tiny_clip,
        pairs_manifest,
        train={"steps": 2, "batch_size": 1, "adam_eps": 1e-2, "lr": 1e-2},
    )
    # a large Adam epsilon keeps updates linear in the gradient, so float noise in near-zero
    # gradients (all-reduce vs. batch sum order) cannot flip an update's sign
    _run(
        [
            str(bin_dir / "accelerate"),
            "launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "-m",
            "mmalign.cli",
            "train",
            str(p),
            "--output-dir",
            str(tmp_path / "two"),
        ],
        env,
    )
    _run(
        [
            sys.executable,
            "-m",
            "mmalign.cli",
            "train",
            str(p),
            "train.batch_size=2",
            "--output-dir",
            str(tmp_path / "one"),
        ],
        env,
    )
    one = load_file(str(ckpt.latest_checkpoint(tmp_path / "one" / "checkpoints") / "trainable.safetensors"))
    two = load_file(str(ckpt.latest_checkpoint(tmp_path / "two" / "checkpoints") / "trainable.safetensors"))
    base_moved = 0.0
    for n in one:
        torch.testing.assert_close(two[n], one[n], rtol=1e-3, atol=1e-5)  # beta=5000 amplifies float noise
        base_moved = max(base_moved, float((one[n]).abs().max()))
    assert base_moved > 0
    # the two-process run logged two steps (metrics averaged over processes)
    lines = (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
    assert sum('"loss"' in l for l in lines) == 2
