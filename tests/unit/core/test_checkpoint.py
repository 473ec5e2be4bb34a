"""Checkpoint manifests, verification, fallback to the newest intact checkpoint, atomic pruning."""

import hashlib
import json

import pytest

from mmalign import checkpoint as ckpt


def write(root, step, payload=b"weights"):
    final = ckpt.step_dir(root, step)
    tmp = ckpt.begin(final)
    (tmp / "trainable.safetensors").write_bytes(payload * 100)
    (tmp / "buffer_0").mkdir()
    (tmp / "buffer_0" / "buffer.safetensors").write_bytes(b"rollout")
    ckpt.commit(tmp, final, {"step": step})
    return final


def test_state_json_carries_sizes_and_hashes_of_every_other_file(tmp_path):
    cp = write(tmp_path, 2)
    files = json.loads((cp / "state.json").read_text())["files"]
    assert set(files) == {"trainable.safetensors", "buffer_0/buffer.safetensors"}
    data = (cp / "trainable.safetensors").read_bytes()
    assert files["trainable.safetensors"] == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert ckpt.verify(cp) is None


@pytest.mark.parametrize(
    "damage, why",
    [
        (
            lambda cp: (cp / "trainable.safetensors").write_bytes(b"weights" * 50),
            "has 350 bytes, the manifest says 700",
        ),
        (
            lambda cp: (cp / "trainable.safetensors").write_bytes(b"weighTs" + b"weights" * 99),
            "does not match its SHA-256",
        ),
        (lambda cp: (cp / "buffer_0" / "buffer.safetensors").unlink(), "buffer_0/buffer.safetensors is missing"),
        (lambda cp: (cp / "state.json").write_text("{not json"), "state.json unreadable"),
        (lambda cp: (cp / "state.json").write_bytes(b"\xff\xfe"), "state.json unreadable"),
    ],
)
def test_verify_names_the_damage(tmp_path, damage, why):
    cp = write(tmp_path, 2)
    damage(cp)
    assert why in ckpt.verify(cp)


def test_latest_intact_falls_back_and_says_what_it_skipped(tmp_path):
    for step in (2, 4, 6):
        write(tmp_path, step)
    (ckpt.step_dir(tmp_path, 6) / "trainable.safetensors").write_bytes(b"")
    (ckpt.step_dir(tmp_path, 4) / "trainable.safetensors").write_bytes(b"x" * 700)
    good, skipped = ckpt.latest_intact(tmp_path)
    assert good == ckpt.step_dir(tmp_path, 2)
    assert [(p.name, "bytes" in w or "SHA-256" in w) for p, w in skipped] == [
        ("step_0000006", True),
        ("step_0000004", True),
    ]
    for step in (2,):
        (ckpt.step_dir(tmp_path, step) / "state.json").unlink()
    assert ckpt.latest_intact(tmp_path)[0] is None


def test_a_checkpoint_without_a_manifest_is_accepted_as_it_is(tmp_path):
    cp = tmp_path / "step_0000003"
    cp.mkdir()
    (cp / "state.json").write_text(json.dumps({"step": 3}))
    assert ckpt.verify(cp) is None


def test_prune_keeps_the_newest_and_an_interrupted_prune_leaves_no_visible_half_checkpoint(tmp_path):
    for step in (1, 2, 3, 4):
        write(tmp_path, step)
    ckpt.prune(tmp_path, 2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_0000003", "step_0000004"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_0000003", "step_0000004"]
    # a prune interrupted after its rename: the renamed checkpoint is out of view and cleared next time
    ckpt.step_dir(tmp_path, 3).rename(tmp_path / ".trash-step_0000003")
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_0000004"]
    ckpt.prune(tmp_path, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_0000004"]


def test_prune_refuses_to_delete_every_checkpoint(tmp_path):
    write(tmp_path, 1)
    with pytest.raises(ValueError, match="keep_last must be >= 1"):
        ckpt.prune(tmp_path, 0)
    assert ckpt.list_checkpoints(tmp_path)
