"""Crash harness: kill -9 a training run at seeded random moments, resume with `--resume latest`
each time, and check the final weights are bitwise those of an uninterrupted run.

A checkpoint every step makes many of the kills land while a checkpoint is being written (in
its temporary directory, its manifest, the rename, the pruning), some while metrics.jsonl is
being appended. Offline (Diffusion-DPO on a pair manifest) and online (GRPO, a checkpoint in the
middle of a round) tiny-model runs.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from mmalign import checkpoint as ckpt
from tests.helpers import ROOT, write_config

KILLS = 6
STEPS = 12
GRPO = {
    "name": "grpo",
    "rollout": {"prompts_per_round": 2, "samples_per_prompt": 3, "num_steps": 3, "steps_per_round": 2},
    "kl_coef": 0.1,
}


def _config(tmp_path, kind, tiny_sd, tiny_clip, pairs_manifest):
    train = {"steps": STEPS, "batch_size": 2, "lr": 1e-3, "checkpoint_every": 1, "keep_last": 2}
    if kind == "offline":
        return write_config(tmp_path / "c.yaml", tiny_sd, tiny_clip, pairs_manifest, train=train)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\ntwo green triangles\n")
    return write_config(
        tmp_path / "c.yaml",
        tiny_sd,
        tiny_clip,
        pairs_manifest,
        method=GRPO,
        data={"kind": "prompts", "prompts": str(prompts)},
        train=train,
    )


def _start(config, run, *flags):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    code = "import sys; from mmalign.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.Popen(
        [sys.executable, "-c", code, "train", str(config), "--output-dir", str(run), *flags],
        cwd=run.parent,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _logged_steps(run):
    try:
        text = (run / "metrics.jsonl").read_text()
    except FileNotFoundError:
        return 0
    steps = []
    for line in text.splitlines():
        try:
            steps.append(json.loads(line).get("step", 0))
        except ValueError:
            pass
    return max(steps, default=0)


def run_with_kills(config, run, seed, kills=KILLS):
    """Train `config` into `run`, kill -9 it `kills` times at seeded moments, finish; return the kill times."""
    rng = random.Random(seed)
    moments = []
    for _ in range(kills):
        flags = ["--resume", "latest"] if ckpt.latest_checkpoint(run / "checkpoints") else ["--overwrite"]
        proc = _start(config, run, *flags)
        start = _logged_steps(run)
        while proc.poll() is None and _logged_steps(run) <= start:  # wait until it trains
            time.sleep(0.02)
        if proc.poll() is not None:  # finished before the kill
            assert proc.returncode == 0, proc.stderr.read()
            break
        delay = rng.uniform(0.0, 0.35)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        moments.append(delay)
    proc = _start(config, run, "--resume", "latest")
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    return moments


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["offline", "online"])
def test_kill_9_at_random_moments_resumes_bitwise(kind, tmp_path, tiny_sd, tiny_clip, pairs_manifest):
    config = _config(tmp_path, kind, tiny_sd, tiny_clip, pairs_manifest)
    full, crashed = tmp_path / "full", tmp_path / "crashed"
    proc = _start(config, full)
    assert proc.wait(timeout=600) == 0, proc.stderr.read()
    moments = run_with_kills(config, crashed, seed=1234 if kind == "offline" else 4321)
    assert len(moments) >= KILLS // 2, moments  # the kills did land mid-run
    last = [ckpt.latest_checkpoint(r / "checkpoints") for r in (full, crashed)]
    assert [c.name for c in last] == [f"step_{STEPS:07d}"] * 2
    for name in ("trainable.safetensors",):
        a, b = (load_file(str(c / name)) for c in last)
        assert all((a[k] == b[k]).all() for k in a), kind
    a, b = (load_file(str(r / "final" / "pytorch_lora_weights.safetensors")) for r in (full, crashed))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    rows = [json.loads(line) for line in (crashed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, STEPS + 1))  # each step once
