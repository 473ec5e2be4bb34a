"""D3PO from human labels: writing a round for labelling, reading the labels, training on them."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from mmalign.cli import main
from mmalign.config import ConfigError, load_config
from mmalign.data.preference import DataError
from mmalign.methods.d3po import D3PO, D3POConfig, d3po_step_loss, read_labels
from mmalign.methods.online import load_buffer, train_steps
from tests.helpers import write_config

PROMPTS = ["a red circle", "a blue square"]


@pytest.fixture(scope="module")
def round_dir(tiny_sd, tmp_path_factory):
    """A labelling round from the base model: 2 prompts -> samples 0,1 (prompt 0) and 2,3 (prompt 1)."""
    out = tmp_path_factory.mktemp("label_round")
    assert (
        main(
            [
                "sample",
                "--pretrained",
                str(tiny_sd),
                "--prompt",
                PROMPTS[0],
                "--prompt",
                PROMPTS[1],
                "--label-pairs",
                "--eta",
                "1.0",
                "--steps",
                "3",
                "--cfg-scale",
                "4",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    return out


@pytest.fixture(scope="module")
def policy(tiny_sd):
    """The generator with its LoRA moved away from the sampler, so log-ratios are not zero."""
    from mmalign.pipelines.sd import LatentDiffusionGenerator, SDGeneratorConfig

    gen = LatentDiffusionGenerator(SDGeneratorConfig(pretrained=str(tiny_sd)))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in gen.trainable().parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return gen


def _labels(path, *rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _row(pair: int, choice, tie=False):
    return {"prompt": PROMPTS[pair], "sample_ids": [2 * pair, 2 * pair + 1], "choice": choice, "tie": tie}


def _method(round_dir, labels, **kw) -> D3PO:
    cfg = D3POConfig(buffer=str(round_dir), labels=str(labels), beta=0.5, clip_eps=None, **kw)
    cfg.validate()
    return D3PO(cfg)


def _loss(m: D3PO, gen, seed=11):
    m.setup(gen, None)
    ro = m.collect(gen, None, [], [])
    return m.loss(m.batch(ro, list(range(len(ro.extras["pairs"]))), [seed] * len(ro.extras["pairs"])), gen)


def test_label_pairs_writes_buffer_images_and_template(round_dir):
    from PIL import Image

    assert (round_dir / "buffer.safetensors").is_file() and (round_dir / "buffer.json").is_file()
    for i in range(4):
        assert Image.open(round_dir / "images" / f"{i:05d}.png").size == (32, 32)
    rows = [json.loads(l) for l in (round_dir / "pairs.jsonl").read_text().splitlines()]
    assert [(r["prompt"], r["sample_ids"], r["choice"], r["tie"]) for r in rows] == [
        (PROMPTS[0], [0, 1], None, False),
        (PROMPTS[1], [2, 3], None, False),
    ]
    assert rows[1]["images"] == ["images/00002.png", "images/00003.png"]
    t = load_file(str(round_dir / "buffer.safetensors"))
    x_T = t["latents"][:, 0]
    assert torch.equal(x_T[0], x_T[1]) and torch.equal(x_T[2], x_T[3]) and not torch.equal(x_T[0], x_T[2])
    assert t["log_probs"].shape == (4, 3)
    assert json.loads((round_dir / "buffer.json").read_text())["prompts"] == [p for p in PROMPTS for _ in (0, 1)]
    with pytest.raises(DataError, match=r"pairs.jsonl:1: choice must be 0 or 1 .*still unlabelled"):
        read_labels(round_dir / "pairs.jsonl", [p for p in PROMPTS for _ in (0, 1)])


def test_label_pairs_needs_stochastic_steps(tiny_sd, tmp_path, capsys):
    assert main(["sample", "--pretrained", str(tiny_sd), "--prompt", "x", "--label-pairs", "--out", str(tmp_path)]) == 2
    assert "--eta > 0" in capsys.readouterr().err


def test_read_labels_valid_file_counts_ties(tmp_path):
    prompts = ["a", "a", "b", "b", "c", "c"]
    p = tmp_path / "labels.jsonl"
    p.write_text(
        json.dumps({"prompt": "a", "sample_ids": [0, 1], "choice": 1, "tie": False, "who": "x"})
        + "\n\n"
        + json.dumps({"prompt": "b", "sample_ids": [2, 3], "choice": None, "tie": True})
        + "\n"
        + json.dumps({"prompt": "c", "sample_ids": [5, 4], "choice": 0, "tie": False})
        + "\n"
    )
    pairs, ties = read_labels(p, prompts)
    assert pairs.tolist() == [[1, 0], [5, 4]] and ties == 1


GOOD = json.dumps({"prompt": "a", "sample_ids": [0, 1], "choice": 0, "tie": False})


@pytest.mark.parametrize(
    "line, error",
    [
        ("{not json", r"labels.jsonl:2: not valid JSON"),
        ("[0, 1]", r"labels.jsonl:2: expected a JSON object"),
        (json.dumps({"prompt": "b", "sample_ids": [2, 3], "tie": False}), r"labels.jsonl:2: missing key 'choice'"),
        (
            json.dumps({"prompt": "b", "sample_ids": [2], "choice": 0, "tie": False}),
            r":2: sample_ids must be a list of 2",
        ),
        (
            json.dumps({"prompt": "b", "sample_ids": [2, 4], "choice": 0, "tie": False}),
            r"labels.jsonl:2: sample id 4 out of range \(the buffer has 4 samples",
        ),
        (
            json.dumps({"prompt": "a", "sample_ids": [2, 3], "choice": 0, "tie": False}),
            r"labels.jsonl:2: prompt 'a' does not match the buffer's prompt of sample 2, 'b'",
        ),
        (
            json.dumps({"prompt": "b", "sample_ids": [2, 3], "choice": 2, "tie": False}),
            r"labels.jsonl:2: choice must be 0 or 1 .*got 2",
        ),
        (json.dumps({"prompt": "b", "sample_ids": [2, 3], "choice": None, "tie": False}), r":2: .*still unlabelled"),
        (json.dumps({"prompt": "b", "sample_ids": [2, 3], "choice": True, "tie": False}), r":2: choice must be 0 or 1"),
        (
            json.dumps({"prompt": "b", "sample_ids": [2, 3], "choice": 1, "tie": True}),
            r":2: tie is true but choice is 1",
        ),
        (json.dumps({"prompt": "b", "sample_ids": [2, 3], "choice": 1, "tie": "no"}), r":2: tie must be true or false"),
    ],
)
def test_read_labels_names_file_and_line(tmp_path, line, error):
    p = tmp_path / "labels.jsonl"
    p.write_text(GOOD + "\n" + line + "\n")
    with pytest.raises(DataError, match=error):
        read_labels(p, ["a", "a", "b", "b"])


def test_read_labels_missing_or_empty_file(tmp_path):
    with pytest.raises(DataError, match="labels file not found"):
        read_labels(tmp_path / "nope.jsonl", ["a"])
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no labels"):
        read_labels(tmp_path / "empty.jsonl", ["a"])


@pytest.mark.parametrize("reference", ["sampler", "base"])
def test_labelled_loss_is_d3po_on_stored_trajectories_in_labelled_order(round_dir, policy, tmp_path, reference):
    labels = _labels(tmp_path / "l.jsonl", _row(0, 1), _row(1, 0))  # prefer sample 1 over 0, sample 2 over 3
    m = _method(round_dir, labels, reference=reference, timestep_fraction=1.0)
    loss, _ = _loss(m, policy)
    assert m.labelled.extras["pairs"].tolist() == [[1, 0], [2, 3]]
    buf = load_buffer(round_dir, policy)
    w, l = [1, 2], [0, 3]
    want, gaps = 0.0, []
    with torch.no_grad():
        for k in train_steps(3, 1.0, 11):
            logp = policy.step_log_prob(buf, k)
            if reference == "base":
                with policy.reference():
                    ref = policy.step_log_prob(buf, k)
                # the buffer was sampled by the base model: its stored log-probs are the base's
                torch.testing.assert_close(ref, buf.log_probs[:, k], rtol=1e-4, atol=1e-3)
            else:
                ref = buf.log_probs[:, k]
            want += d3po_step_loss(logp[w], logp[l], ref[w], ref[l], 0.5, None).mean() / 3
            gaps.append(((logp - ref)[w] - (logp - ref)[l]).abs())
    # the policy differs from the sampler: not log 2 by construction (per-dimension means over 4x8x8 latents)
    assert float(torch.cat(gaps).min()) > 1e-2 / 256
    torch.testing.assert_close(loss.detach(), want, rtol=1e-4, atol=1e-5)


def test_swapping_the_choice_flips_the_gradient(round_dir, policy, tmp_path):
    """One labelled pair, one step: the gradients of the two labellings are anti-parallel."""
    params = [p for p in policy.trainable().parameters() if p.requires_grad]
    grads, accs = [], []
    for choice in (0, 1):
        labels = _labels(tmp_path / f"l{choice}.jsonl", _row(0, choice), _row(1, None, tie=True))
        loss, metrics = _loss(_method(round_dir, labels, timestep_fraction=0.01), policy)
        g = torch.autograd.grad(loss, params, allow_unused=True)
        grads.append(torch.cat([x.flatten() for x in g if x is not None]))
        accs.append(metrics["implicit_acc"])
    assert grads[0].norm() > 0
    assert float(torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0)) == pytest.approx(-1.0, abs=1e-4)
    assert sorted(accs) == [0.0, 1.0]  # the sign of the log-ratio difference flips


def test_ties_contribute_nothing_and_are_counted(round_dir, policy, tmp_path):
    only = _method(round_dir, _labels(tmp_path / "a.jsonl", _row(1, 1)))
    with_tie = _method(round_dir, _labels(tmp_path / "b.jsonl", _row(0, None, tie=True), _row(1, 1)))
    a, _ = _loss(only, policy)
    b, _ = _loss(with_tie, policy)
    torch.testing.assert_close(a.detach(), b.detach())
    assert with_tie.round_metrics(with_tie.labelled) == {"pairs": 1.0, "ties": 1.0}
    all_ties = _method(round_dir, _labels(tmp_path / "c.jsonl", _row(0, None, True), _row(1, None, True)))
    with pytest.raises(DataError, match="all 2 labelled pairs are ties"):
        all_ties.setup(policy, None)


def test_labels_config_is_checked(round_dir, policy, tmp_path):
    labels = _labels(tmp_path / "l.jsonl", _row(0, 1))
    with pytest.raises(ValueError, match="give both"):
        D3POConfig(labels=str(labels)).validate()
    with pytest.raises(ValueError, match="tie_threshold"):
        D3POConfig(buffer=str(round_dir), labels=str(labels), tie_threshold=0.1).validate()
    with pytest.raises(ValueError, match="no buffer.safetensors"):
        D3POConfig(buffer=str(tmp_path), labels=str(labels)).validate()
    with pytest.raises(ConfigError, match=r"remove `reward:`"):
        _method(round_dir, labels).setup(policy, reward=object())


def _labels_cfg(tmp_path, tiny_sd, tiny_clip, pairs_manifest, round_dir, **sections):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("unused\n")
    labels = _labels(tmp_path / "l.jsonl", _row(0, 1), _row(1, 0))
    method = {"name": "d3po", "buffer": str(round_dir), "labels": str(labels)}
    return write_config(
        tmp_path / "c.yaml",
        tiny_sd,
        tiny_clip,
        pairs_manifest,
        method=method,
        data={"kind": "prompts", "prompts": str(prompts)},
        train={"steps": 2, "batch_size": 2, "lr": 1e-3},
        **sections,
    )


def test_bad_labels_fail_at_config_load(tmp_path, tiny_sd, tiny_clip, pairs_manifest, round_dir):
    """An unlabelled line or a corrupt buffer.json is named when the config loads, before any model."""
    cfg = _labels_cfg(tmp_path, tiny_sd, tiny_clip, pairs_manifest, round_dir, reward=None)
    load_config(cfg)  # the good file passes
    _labels(tmp_path / "l.jsonl", _row(0, 1), _row(1, None))
    with pytest.raises(ConfigError, match=r"l.jsonl:2: choice must be 0 or 1 .*still unlabelled"):
        load_config(cfg)
    _labels(tmp_path / "l.jsonl", _row(0, 1))
    broken = tmp_path / "broken_round"
    shutil.copytree(round_dir, broken)
    (broken / "buffer.json").write_text("{truncated")
    with pytest.raises(ConfigError, match=r"buffer.json: not a labelling buffer's metadata"):
        load_config(cfg, [f"method.buffer={broken}"])


def test_trainer_refuses_a_reward_with_labels(tmp_path, tiny_sd, tiny_clip, pairs_manifest, round_dir, capsys):
    cfg = _labels_cfg(tmp_path, tiny_sd, tiny_clip, pairs_manifest, round_dir)  # write_config sets `reward: clip`
    assert main(["train", str(cfg), "--output-dir", str(tmp_path / "run")]) == 2
    assert "method.labels: D3PO takes its preferences from" in capsys.readouterr().err


def test_d3po_trains_from_labels(tmp_path, tiny_sd, tiny_clip, pairs_manifest, round_dir):
    from mmalign.trainer import Trainer

    cfg = _labels_cfg(tmp_path, tiny_sd, tiny_clip, pairs_manifest, round_dir, reward=None)
    tr = Trainer(load_config(cfg), run_dir=tmp_path / "run")
    before = {n: v.detach().clone() for n, v in tr.generator.trainable().named_parameters() if v.requires_grad}
    tr.fit()
    after = dict(tr.generator.trainable().named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in before)
    logs = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert logs[0]["rollout/pairs"] == 2.0 and logs[0]["rollout/ties"] == 0.0
    assert "rollout/reward_mean" not in logs[0]
