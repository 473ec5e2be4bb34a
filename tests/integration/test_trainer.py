import json

import pytest
import torch
from safetensors.torch import load_file

from mmalign import checkpoint as ckpt
from mmalign.config import load_config
from mmalign.trainer import Trainer, TrainingError
from tests.helpers import write_config


def _weights(run_dir):
    return load_file(str(ckpt.latest_checkpoint(run_dir / "checkpoints") / "trainable.safetensors"))


def test_every_trainable_parameter_changes(tmp_path, tiny_sd, tiny_clip, pairs_manifest):
    cfg = load_config(write_config(tmp_path / "c.yaml", tiny_sd, tiny_clip, pairs_manifest, train={"steps": 2}))
    tr = Trainer(cfg, run_dir=tmp_path / "run")
    before = {n: p.detach().clone() for n, p in tr.generator.trainable().named_parameters() if p.requires_grad}
    tr.fit()
    after = _weights(tmp_path / "run")
    assert set(after) == set(before)
    unchanged = [n for n in before if torch.equal(before[n], after[n])]
    assert not unchanged, unchanged[:5]
    lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines if "loss" in l] == [1, 2]
    assert (tmp_path / "run" / "final" / "pytorch_lora_weights.safetensors").is_file()
    assert load_config(tmp_path / "run" / "config.yaml").method.args.beta == 5000.0


def test_training_flushes_float32_denormals_unless_told_not_to(tmp_path, tiny_sd, tiny_clip, pairs_manifest):
    denormal = lambda: torch.tensor([1e-39], dtype=torch.float32) * 1.0  # below float32's smallest normal
    try:
        torch.set_flush_denormal(False)
        cfg = load_config(
            write_config(
                tmp_path / "c.yaml", tiny_sd, tiny_clip, pairs_manifest, train={"steps": 1, "flush_denormal": False}
            )
        )
        Trainer(cfg, run_dir=tmp_path / "off").fit()
        assert denormal().item() > 0
        cfg = load_config(write_config(tmp_path / "c.yaml", tiny_sd, tiny_clip, pairs_manifest, train={"steps": 1}))
        Trainer(cfg, run_dir=tmp_path / "on").fit()
        assert denormal().item() == 0.0
    finally:
        torch.set_flush_denormal(False)


def test_resume_is_bitwise_exact(tmp_path, tiny_sd, tiny_clip, pairs_manifest):
    """4 steps straight == 2 steps, stop, resume for 2 more (with accumulation, warmup and EMA)."""
    train = {
        "steps": 4,
        "grad_accum": 2,
        "batch_size": 2,
        "warmup_steps": 2,
        "ema_decay": 0.9,
        "checkpoint_every": 2,
        "keep_last": 5,
    }
    p = write_config(tmp_path / "c.yaml", tiny_sd, tiny_clip, pairs_manifest, train=train)
    Trainer(load_config(p), run_dir=tmp_path / "full").fit()
    Trainer(load_config(p, ["train.steps=2"]), run_dir=tmp_path / "split").fit()
    Trainer(load_config(p), run_dir=tmp_path / "split", resume="latest").fit()
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "split")
    for n in a:
        assert torch.equal(a[n], b[n]), n
    fa = load_file(str(tmp_path / "full/final/pytorch_lora_weights.safetensors"))
    fb = load_file(str(tmp_path / "split/final/pytorch_lora_weights.safetensors"))
    for n in fa:  # EMA weights too
        assert torch.equal(fa[n], fb[n]), n


def test_evaluation_uses_the_ema_weights(tmp_path, tiny_sd, tiny_clip, pairs_manifest, monkeypatch):
    """With train.ema_decay, evals sample the EMA weights (what `final/` holds), then restore."""
    p = write_config(
        tmp_path / "c.yaml", tiny_sd, tiny_clip, pairs_manifest, train={"steps": 3, "ema_decay": 0.5, "lr": 1e-2}
    )
    tr = Trainer(load_config(p), run_dir=tmp_path / "run")
    tr.fit()
    params = [q for q in tr.unwrapped.parameters() if q.requires_grad]
    trained = [q.detach().clone() for q in params]
    shadow = [q.detach().clone() for q in tr.ema.shadow_params]
    assert any(not torch.equal(a, b) for a, b in zip(trained, shadow))  # EMA differs from the raw weights
    seen = []

    def fake_eval(generator, reward, prompts, *a, **k):
        seen.append([q.detach().clone() for q in params])
        return {}, torch.zeros(1, 3, 8, 8)

    monkeypatch.setattr("mmalign.evaluation.evaluate_generator", fake_eval)
    tr.cfg.eval.enabled = True
    tr.evaluate("check")
    assert all(torch.equal(a, b) for a, b in zip(seen[0], shadow))
    assert all(torch.equal(a, b) for a, b in zip(params, trained))  # restored afterwards
    final = load_file(str(tmp_path / "run/final/pytorch_lora_weights.safetensors"))
    assert len(final) == len(shadow)


def test_checkpoint_is_atomic(tmp_path, tiny_sd, tiny_clip, pairs_manifest, monkeypatch):
    p = write_config(tmp_path / "c.yaml", tiny_sd, tiny_clip, pairs_manifest, train={"steps": 4, "checkpoint_every": 2})
    tr = Trainer(load_config(p, ["train.steps=2"]), run_dir=tmp_path / "run")
    tr.fit()
    good = ckpt.latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert good.name == "step_0000002"
    files_before = sorted(f.name for f in good.iterdir())

    # crash in the middle of writing the next checkpoint: after the weights, before the optimizer
    real_save = torch.save

    def crash(obj, f, *a, **k):
        if str(f).endswith("optimizer.pt"):
            raise OSError("disk full")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", crash)
    tr2 = Trainer(load_config(p), run_dir=tmp_path / "run", resume="latest")
    with pytest.raises(OSError, match="disk full"):
        tr2.fit()
    monkeypatch.setattr(torch, "save", real_save)
    cps = ckpt.list_checkpoints(tmp_path / "run" / "checkpoints")
    assert [c.name for c in cps] == ["step_0000002"]  # the half-written step_0000004 is not visible
    assert sorted(f.name for f in cps[0].iterdir()) == files_before
    assert (tmp_path / "run" / "checkpoints" / ".tmp-step_0000004").exists()
    # and the run resumes from the intact checkpoint
    Trainer(load_config(p), run_dir=tmp_path / "run", resume="latest").fit()
    assert ckpt.latest_checkpoint(tmp_path / "run" / "checkpoints").name == "step_0000004"
    assert not (tmp_path / "run" / "checkpoints" / ".tmp-step_0000004").exists()


def test_nan_loss_is_a_clear_error_and_keeps_checkpoints(tmp_path, tiny_sd, tiny_clip, pairs_manifest, monkeypatch):
    p = write_config(tmp_path / "c.yaml", tiny_sd, tiny_clip, pairs_manifest, train={"steps": 4, "checkpoint_every": 2})
    tr = Trainer(load_config(p), run_dir=tmp_path / "run")
    real = tr.method.loss
    calls = {"n": 0}

    def poisoned(batch, gen):
        calls["n"] += 1
        loss, m = real(batch, gen)
        return (loss * float("nan"), m) if calls["n"] == 3 else (loss, m)

    tr.method.loss = poisoned
    with pytest.raises(TrainingError, match=r"non-finite loss \(nan\) at step 3.*last checkpoint: .*step_0000002"):
        tr.fit()
    assert ckpt.latest_checkpoint(tmp_path / "run" / "checkpoints").name == "step_0000002"


def test_resume_latest_skips_a_damaged_checkpoint_and_matches_an_uninterrupted_run(
    tmp_path, tiny_sd, tiny_clip, pairs_manifest, capsys
):
    p = write_config(
        tmp_path / "c.yaml",
        tiny_sd,
        tiny_clip,
        pairs_manifest,
        train={"steps": 4, "checkpoint_every": 1, "keep_last": 3},
    )
    Trainer(load_config(p), run_dir=tmp_path / "full").fit()
    Trainer(load_config(p, ["train.steps=3"]), run_dir=tmp_path / "split").fit()
    newest = ckpt.step_dir(tmp_path / "split" / "checkpoints", 3)
    (newest / "optimizer.pt").write_bytes((newest / "optimizer.pt").read_bytes()[:-10])  # truncated
    capsys.readouterr()
    Trainer(load_config(p), run_dir=tmp_path / "split", resume="latest").fit()
    out = capsys.readouterr().out
    assert "skipping" in out and "step_0000003" in out and "optimizer.pt has" in out
    assert "resumed from" in out and "step_0000002" in out
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "split")
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(TrainingError, match="damaged checkpoint: optimizer.pt"):
        bad = ckpt.step_dir(tmp_path / "split" / "checkpoints", 4)
        (bad / "optimizer.pt").write_bytes(b"")
        Trainer(load_config(p), run_dir=tmp_path / "split", resume=str(bad)).fit()


def test_resume_without_checkpoint_is_an_error(tmp_path, tiny_sd, tiny_clip, pairs_manifest):
    p = write_config(tmp_path / "c.yaml", tiny_sd, tiny_clip, pairs_manifest)
    with pytest.raises(TrainingError, match="no intact checkpoint"):
        Trainer(load_config(p), run_dir=tmp_path / "run", resume="latest").fit()


def test_full_finetune_and_eval_grid(tmp_path, tiny_sd, tiny_clip, pairs_manifest):
    p = write_config(
        tmp_path / "c.yaml",
        tiny_sd,
        tiny_clip,
        pairs_manifest,
        generator={"finetune": "full"},
        train={"steps": 1, "gradient_checkpointing": True},
        eval={"enabled": True, "prompts": ["a red square", "a blue circle"], "num_steps": 2},
    )
    summary = Trainer(load_config(p), run_dir=tmp_path / "run").fit()
    assert (tmp_path / "run" / "final" / "unet" / "config.json").is_file()
    assert (tmp_path / "run" / "samples" / "step_0000000.png").is_file()
    assert (tmp_path / "run" / "samples" / "step_0000001.png").is_file()
    assert "eval/reward" in summary


def test_eval_at_start_false_skips_only_the_base_evaluation(tmp_path, tiny_sd, tiny_clip, pairs_manifest):
    p = write_config(
        tmp_path / "c.yaml",
        tiny_sd,
        tiny_clip,
        pairs_manifest,
        train={"steps": 2},
        eval={"enabled": True, "at_start": False, "every": 1, "prompts": ["a red square"], "num_steps": 2},
    )
    Trainer(load_config(p), run_dir=tmp_path / "run").fit()
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval" in r] == [1, 2]
    assert not (tmp_path / "run" / "samples" / "step_0000000.png").exists()
