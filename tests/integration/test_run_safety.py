"""Run directories: refused unless resumed or overwritten, locked, nothing written before validation;
resume bookkeeping (config.yaml, metrics.jsonl); signals; disk errors; train.skip_nonfinite."""

import errno
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from mmalign import checkpoint as ckpt
from mmalign import rundir
from mmalign.cli import main
from mmalign.config import ConfigError, load_config
from mmalign.trainer import Trainer, TrainingError
from tests.helpers import ROOT, write_config


def _weights(run_dir):
    return load_file(str(ckpt.latest_checkpoint(run_dir / "checkpoints") / "trainable.safetensors"))


def _steps(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if "loss" in r]


def _train(capsys, *args):
    capsys.readouterr()
    rc = main(["train", *map(str, args)])
    return rc, capsys.readouterr().err


def _one_line_error(err):
    """The one `error: ...` line (a progress bar may precede it on its line)."""
    assert err.count("error: ") == 1 and "Traceback" not in err, err
    return "error: " + err.split("error: ")[1].splitlines()[0]


def _snapshot(run_dir):
    return {p.relative_to(run_dir): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


@pytest.fixture
def cfg(tmp_path, tiny_sd, tiny_clip, pairs_manifest, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return write_config(
        tmp_path / "c.yaml",
        tiny_sd,
        tiny_clip,
        pairs_manifest,
        train={"steps": 2, "checkpoint_every": 1, "keep_last": 5},
    )


def test_a_directory_holding_a_run_is_refused_unless_resumed_or_overwritten(tmp_path, cfg, capsys):
    run = tmp_path / "run"
    assert _train(capsys, cfg, "--output-dir", run)[0] == 0
    before = _snapshot(run)
    rc, err = _train(capsys, cfg, "train.lr=0.01", "--output-dir", run)
    line = _one_line_error(err)
    assert rc == 2 and str(run) in line and "--resume" in line and "--overwrite" in line
    assert _snapshot(run) == before  # not one byte of the old run changed
    rc, err = _train(capsys, cfg, "--output-dir", run, "--overwrite")
    assert rc == 0
    moved = [p for p in tmp_path.iterdir() if p.name.startswith("run.replaced-")]
    assert len(moved) == 1 and _snapshot(moved[0]) == before  # the old run, moved aside whole
    assert _steps(run) == [1, 2]
    assert not (run / rundir.LOCK_NAME).exists()  # released at the end


def test_nothing_is_written_before_the_config_and_data_are_validated(tmp_path, cfg, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "missing.png", "rejected": "missing2.png"}\n')
    rc, err = _train(capsys, cfg, f"data.path={bad}", "--output-dir", tmp_path / "fresh")
    assert rc == 2 and "Traceback" not in err
    assert not (tmp_path / "fresh").exists()
    # a resumed run whose data would change is refused before anything is written
    run = tmp_path / "run"
    assert _train(capsys, cfg, "--output-dir", run)[0] == 0
    before = _snapshot(run)
    rc, err = _train(capsys, cfg, f"data.path={bad}", "train.steps=3", "--output-dir", run, "--resume")
    line = _one_line_error(err)
    assert rc == 2 and "data.path" in line and "train.steps" not in line.split("differ")[0]
    assert _snapshot(run) == before


def test_a_live_lock_refuses_a_second_run_and_a_stale_one_is_taken_over(tmp_path, cfg, capsys):
    run = tmp_path / "run"
    run.mkdir()
    lock = run / rundir.LOCK_NAME
    lock.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))  # a live process
    rc, err = _train(capsys, cfg, "--output-dir", run)
    line = _one_line_error(err)
    assert rc == 2 and "in use by another run" in line and str(os.getpid()) in line
    assert sorted(p.name for p in run.iterdir()) == [rundir.LOCK_NAME]
    dead = subprocess.Popen(["true"])
    dead.wait()
    lock.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    capsys.readouterr()
    assert main(["train", str(cfg), "--output-dir", str(run)]) == 0
    assert "taking over the stale lock" in capsys.readouterr().out
    assert not lock.exists()


def test_two_trainers_cannot_share_a_directory(tmp_path, cfg):
    first = Trainer(load_config(cfg), run_dir=tmp_path / "run")
    first.lock.acquire()
    try:
        with pytest.raises(TrainingError, match="in use by another run"):
            Trainer(load_config(cfg), run_dir=tmp_path / "run").fit()
    finally:
        first.lock.release()


def test_resume_refuses_optimisation_changes_and_records_the_safe_ones(tmp_path, cfg, capsys):
    run = tmp_path / "run"
    assert _train(capsys, cfg, "--output-dir", run)[0] == 0
    before = _snapshot(run)
    rc, err = _train(capsys, cfg, "train.lr=0.5", "run.seed=3", "train.steps=3", "--output-dir", run, "--resume")
    line = _one_line_error(err)
    assert rc == 2 and "run.seed, train.lr differ" in line
    assert _snapshot(run) == before
    rc, err = _train(capsys, cfg, "train.steps=4", "train.log_every=2", "--output-dir", run, "--resume")
    assert rc == 0
    used = load_config(run / "config.yaml")
    assert used.train.steps == 4 and used.train.log_every == 2 and used.train.lr == 1e-3
    assert _steps(run) == [1, 2, 4]


def test_metrics_hold_each_step_once_after_a_resume(tmp_path, cfg, capsys):
    run = tmp_path / "run"
    assert _train(capsys, cfg, "train.steps=4", "--output-dir", run)[0] == 0
    # as if killed after logging step 4 but before its checkpoint, mid-way through a metrics line
    for step in (3, 4):
        shutil.rmtree(ckpt.step_dir(run / "checkpoints", step))
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "los')
    assert _train(capsys, cfg, "train.steps=4", "--output-dir", run, "--resume")[0] == 0
    assert _steps(run) == [1, 2, 3, 4]
    rows = (run / "metrics.jsonl").read_text().splitlines()
    assert sum("data/pairs" in r for r in rows) == 1
    full = tmp_path / "full"
    assert _train(capsys, cfg, "train.steps=4", "--output-dir", full)[0] == 0
    a, b = _weights(full), _weights(run)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_disk_full_while_checkpointing_is_one_line_and_keeps_the_previous_checkpoint(
    tmp_path, cfg, capsys, monkeypatch
):
    run = tmp_path / "run"
    real = torch.save

    def full(obj, f, *a, **k):
        if str(f).endswith("optimizer.pt") and "step_0000002" in str(f):
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", full)
    rc, err = _train(capsys, cfg, "--output-dir", run)
    line = _one_line_error(err)
    assert rc == 2 and "disk full while writing" in line and "optimizer.pt" in line
    good = ckpt.latest_checkpoint(run / "checkpoints")
    assert good.name == "step_0000001" and ckpt.verify(good) is None
    assert not (run / rundir.LOCK_NAME).exists()


def test_torch_stream_errors_on_a_full_or_read_only_disk_are_named(tmp_path, cfg, capsys, monkeypatch):
    real = torch.save

    def opaque(obj, f, *a, **k):  # what torch.save raises when the disk fills mid-write
        if str(f).endswith("scheduler.pt"):
            raise RuntimeError("[enforce fail at inline_container.cc:595] . PytorchStreamWriter failed writing file")
        return real(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", opaque)
    monkeypatch.setattr(rundir.shutil, "disk_usage", lambda p: type("U", (), {"free": 0})())
    rc, err = _train(capsys, cfg, "--output-dir", tmp_path / "run")
    assert rc == 2 and "disk full while writing" in _one_line_error(err)
    for code, words in [
        (errno.EROFS, "read-only file system: cannot write"),
        (errno.EACCES, "permission denied:"),
        (errno.EDQUOT, "disk full while writing"),
    ]:
        assert rundir.disk_problem(tmp_path, OSError(code, "x", "/some/file")) == f"{words} /some/file"
    assert rundir.disk_problem(tmp_path, OSError(errno.EIO, "x")) is None  # other errors are not renamed


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through chmod")
def test_a_read_only_run_directory_is_named(tmp_path, cfg, capsys):
    run = tmp_path / "run"
    run.mkdir()
    run.chmod(0o555)
    try:
        rc, err = _train(capsys, cfg, "--output-dir", run)
    finally:
        run.chmod(0o755)
    assert rc == 2 and str(run) in _one_line_error(err)


def _poison(tr, bad_calls):
    real, calls = tr.method.loss, {"n": 0}

    def poisoned(batch, gen):
        calls["n"] += 1
        loss, m = real(batch, gen)
        return (loss * float("nan"), m) if calls["n"] in bad_calls else (loss, m)

    tr.method.loss = poisoned


def test_skip_nonfinite_skips_and_counts_a_bad_step(tmp_path, cfg):
    tr = Trainer(load_config(cfg, ["train.steps=4", "train.skip_nonfinite=2"]), run_dir=tmp_path / "run")
    _poison(tr, {3})
    tr.fit()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    skipped = [r for r in rows if "nonfinite_skipped" in r]
    assert [(r["step"], r["nonfinite_skipped"], r["nonfinite_loss"]) for r in skipped] == [(3, 1, "nan")]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 4]
    # the skipped step made no optimizer update
    opt = torch.load(ckpt.step_dir(tmp_path / "run" / "checkpoints", 4) / "optimizer.pt", weights_only=True)
    assert {float(s["step"]) for s in opt["state"].values()} == {3.0}
    assert (tmp_path / "run" / "final").is_dir()


def test_skip_nonfinite_rolls_back_after_n_in_a_row(tmp_path, cfg, capsys):
    tr = Trainer(
        load_config(cfg, ["train.steps=4", "train.skip_nonfinite=2", "train.checkpoint_every=2"]),
        run_dir=tmp_path / "run",
    )
    _poison(tr, {3, 4})
    tr.fit()
    out = capsys.readouterr().out
    assert "rolled back to" in out and "step_0000002" in out
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["rollback"]["from_step"] for r in rows if "rollback" in r] == [4]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]  # each step once
    assert not [r for r in rows if "nonfinite_skipped" in r]  # the rolled-back steps' rows are dropped


def test_skip_nonfinite_without_a_checkpoint_stops_with_the_error(tmp_path, cfg):
    tr = Trainer(
        load_config(cfg, ["train.steps=4", "train.skip_nonfinite=2", "train.checkpoint_every=0"]),
        run_dir=tmp_path / "run",
    )
    _poison(tr, {1, 2})
    with pytest.raises(TrainingError, match="2 non-finite steps in a row up to step 2.*no checkpoint"):
        tr.fit()


def test_skip_nonfinite_is_range_checked(cfg):
    with pytest.raises(ConfigError, match="train.skip_nonfinite"):
        load_config(cfg, ["train.skip_nonfinite=-1"])


def _cli(args, cwd):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    code = "import sys; from mmalign.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.Popen(
        [sys.executable, "-c", code, "train", *map(str, args)],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _interrupt_when_training(proc, run, sig):
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (run / "metrics.jsonl").is_file() and '"loss"' in (run / "metrics.jsonl").read_text():
            proc.send_signal(sig)
            break
        time.sleep(0.05)
    out, err = proc.communicate(timeout=120)
    return proc.returncode, err


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_stops_cleanly_and_prints_the_resume_command(tmp_path, cfg, capsys, sig, code):
    run = tmp_path / "run"
    overrides = ["train.steps=16", "train.checkpoint_every=0"]
    rc, err = _interrupt_when_training(_cli([cfg, *overrides, "--output-dir", run], tmp_path), run, sig)
    assert rc == code and "Traceback" not in err, err
    line = [x for x in err.splitlines() if "Resume with:" in x]
    assert len(line) == 1, err
    command = line[0].split("Resume with: ")[1]
    assert command == shlex.join(
        ["mmalign", "train", str(cfg), *overrides, "--output-dir", str(run), "--resume", "latest"]
    )
    done = ckpt.latest_checkpoint(run / "checkpoints")
    assert ckpt.verify(done) is None and not list((run / "checkpoints").glob(".tmp-*"))
    assert _steps(run) == list(range(1, int(done.name[5:]) + 1))  # every finished step, once, whole lines
    if sig != signal.SIGINT:
        return
    assert _train(capsys, *shlex.split(command)[2:])[0] == 0
    full = tmp_path / "full"
    assert _train(capsys, cfg, *overrides, "--output-dir", full)[0] == 0
    a, b = _weights(full), _weights(run)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _steps(run) == list(range(1, 17))


def test_ctrl_c_before_training_is_one_line_and_suggests_the_same_resume(tmp_path, cfg, capsys, monkeypatch):
    run = tmp_path / "run"
    assert _train(capsys, cfg, "--output-dir", run)[0] == 0
    before = _snapshot(run)

    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "_build_data", interrupted)
    rc, err = _train(capsys, cfg, "train.steps=3", "--output-dir", run, "--resume")
    assert rc == 130 and "Traceback" not in err
    assert err.strip().endswith(
        shlex.join(["mmalign", "train", str(cfg), "train.steps=3", "--output-dir", str(run), "--resume", "latest"])
    )
    assert _snapshot(run) == before
