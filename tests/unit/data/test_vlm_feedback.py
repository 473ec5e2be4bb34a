"""AI-feedback pair builder (mmalign/data/vlm_feedback.py): the shipped toy VLM sampling K
answers ranked by the toy world's exact checker or a tiny random VLM judge, POVID-style
perturbed rejections, and the `mmalign pairs` command."""

import json
import random
from types import SimpleNamespace

import pytest
import torch

from mmalign.cli import main
from mmalign.data.preference import DataError
from mmalign.data.vlm import read_rows
from mmalign.data.vlm_feedback import (
    DEFAULT_JUDGE_TEMPLATE,
    build_feedback_pairs,
    compose_texts,
    judge_scorer,
    read_items,
    rule_scorer,
)
from mmalign.media import MediaError
from mmalign.toy.vlm_world import QA, QTYPES, check_answer, question_type, questions_for, split_scenes, wrong_answer


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """8 toy train scenes, one question each (every type), as an items JSONL + PNGs; and a
    pixel -> scene lookup so rule scorers can call the exact checker."""
    root = tmp_path_factory.mktemp("items")
    (root / "images").mkdir()
    rng = random.Random(0)
    rows, scenes = [], {}
    for i, sc in enumerate(split_scenes("train", 8, seed=7)):
        qas = {qa.qtype: qa for qa in questions_for(sc, rng)}
        qa = qas.get(QTYPES[i % len(QTYPES)]) or next(iter(qas.values()))
        im = sc.render()
        im.save(root / "images" / f"{i}.png")
        scenes[im.convert("RGB").tobytes()] = sc
        rows.append({"image": f"images/{i}.png", "prompt": qa.question, "reference": qa.answer, "qtype": qa.qtype})
    path = root / "items.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return SimpleNamespace(path=path, scene=lambda im: scenes[im.convert("RGB").tobytes()])


@pytest.fixture(scope="module")
def generator():
    from mmalign.pipelines.vlm import VLMGenerator, VLMGeneratorConfig

    return VLMGenerator(VLMGeneratorConfig(pretrained="toy:vlm_toy", finetune="none", max_new_tokens=12))


@pytest.fixture(scope="module")
def judge():
    from mmalign.rewards import fixtures as fx
    from mmalign.rewards.common import build_reward

    d = fx.tiny("llava")["model"]
    return d, build_reward({"name": "vlm_judge", "model": d, "yes_no_template": "{prompt}"}, "reward")


def checker(toy):
    return rule_scorer(lambda im, prompt, response: check_answer(prompt, response, toy.scene(im)))


class StubGenerator:
    """rollout -> fixed answers for the i-th item (prompt-major), like VLMGenerator.rollout."""

    def __init__(self, answers):
        self.answers = list(answers)

    def rollout(self, prompts, images=None, num_samples=1, **_):
        assert len(images) == len(prompts)
        batch, self.answers = self.answers[: len(prompts)], self.answers[len(prompts) :]
        return SimpleNamespace(samples=SimpleNamespace(text=[a for ans in batch for a in ans[:num_samples]]))


def test_toy_policy_ranked_by_the_exact_checker(toy, generator, tmp_path):
    score = checker(toy)
    report = build_feedback_pairs(
        generator, toy.path, score, num_samples=4, out_dir=tmp_path, seed=0, log=lambda *_: None
    )
    assert report.items == 8 and report.pairs + report.ties_dropped == 8
    assert report.pairs >= 1  # the toy VLM is imperfect: some items get a right and a wrong sample
    rows = read_rows(report.path).rows  # the format the VLM methods read
    assert len(rows) == report.pairs
    raw = [json.loads(line) for line in report.path.read_text().splitlines()]
    for row, r in zip(rows, raw):
        sc = toy.scene(_image(row))
        assert row.chosen != row.rejected
        assert check_answer(row.prompt, row.chosen, sc) and not check_answer(row.prompt, row.rejected, sc)
        assert r["chosen_score"] >= r["rejected_score"] and row.margin == r["chosen_score"] - r["rejected_score"] == 1
        assert len(r["scores"]) == 4 and r["qtype"] in QTYPES  # extra item keys are carried


def _image(row):
    from mmalign.data.vlm import load_row_images

    return load_row_images(row)[0]


def test_ties_are_dropped_and_counted(toy, tmp_path):
    items = read_items(toy.path)[:3]
    answers = [["a", "a", "a"], ["b", "c", "b"], ["x", "y", "z"]]
    score = rule_scorer(lambda im, prompt, r: {"b": 0.0, "c": 2.0, "x": 1.0, "y": 1.0, "z": 1.0}.get(r, 5.0))
    report = build_feedback_pairs(
        StubGenerator(answers), items, score, num_samples=3, out_dir=tmp_path, log=lambda *_: None
    )
    assert (report.pairs, report.ties_dropped) == (1, 2)  # item 0: same text; item 2: equal scores
    (row,) = read_rows(report.path).rows
    assert (row.chosen, row.rejected, row.margin) == ("c", "b", 2.0)
    with pytest.raises(ValueError, match="K must be >= 2"):
        build_feedback_pairs(StubGenerator(answers), items, score, num_samples=1, out_dir=tmp_path)


def test_judge_scorer_equals_the_judge_on_the_composed_text(toy, generator, judge, tmp_path):
    from mmalign.media import pil_to_tensor
    from mmalign.types import Samples

    _, reward = judge
    score = judge_scorer(reward)
    items = read_items(toy.path)[:3]
    ims = [_image(it.row()) for it in items] * 2
    prompts = [it.prompt for it in items] * 2
    responses = ["red", "two", "yes", "a blue circle", "no", "zero"]
    got = score(ims, prompts, responses)
    texts = compose_texts(DEFAULT_JUDGE_TEMPLATE, prompts, responses)
    assert "Question: " in texts[0] and "Answer: red" in texts[0]
    want = reward(Samples(images=torch.stack([pil_to_tensor(im) for im in ims])), texts)
    torch.testing.assert_close(got, want)
    # end to end with the toy policy
    report = build_feedback_pairs(generator, items, score, num_samples=3, out_dir=tmp_path, log=lambda *_: None)
    assert report.pairs + report.ties_dropped == 3 and report.pairs >= 1
    for r in map(json.loads, report.path.read_text().splitlines()):
        assert r["chosen"] != r["rejected"] and r["chosen_score"] > r["rejected_score"]
        assert r["margin"] == pytest.approx(r["chosen_score"] - r["rejected_score"])
    assert len(read_rows(report.path).rows) == report.pairs


def test_judge_scorer_refuses_non_image_rewards_and_bad_templates(judge):
    _, reward = judge
    with pytest.raises(ValueError, match="modality 'audio'"):
        judge_scorer(SimpleNamespace(name="a", modality="audio"))
    with pytest.raises(ValueError, match=r"\{response\}"):
        judge_scorer(reward, template="Is {prompt} right?")


def test_povid_perturbed_rejections_are_wrong(toy, tmp_path):
    rng = random.Random(0)

    def perturb(im, prompt, reference):
        return wrong_answer(QA(question_type(prompt), prompt, reference), toy.scene(im), rng)

    report = build_feedback_pairs(
        None, toy.path, checker(toy), out_dir=tmp_path, rejected="perturb", perturb=perturb, log=lambda *_: None
    )
    rows = read_rows(report.path).rows
    assert report.pairs == len(rows) == 8 and report.ties_dropped == 0
    for row in rows:
        sc = toy.scene(_image(row))
        assert check_answer(row.prompt, row.chosen, sc) and not check_answer(row.prompt, row.rejected, sc)
        assert row.margin == 1.0


def test_items_errors_name_the_problem(tmp_path, toy):
    with pytest.raises(DataError, match="items file not found"):
        read_items(tmp_path / "nope.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"image": "missing.png", "prompt": "how many squares?"}) + "\n")
    with pytest.raises(MediaError, match=r"bad.jsonl:1.*missing.png"):
        read_items(bad)
    (tmp_path / "corrupt.png").write_bytes(b"not a png")
    bad.write_text(json.dumps({"image": "corrupt.png", "prompt": "how many squares?"}) + "\n")
    with pytest.raises(MediaError, match="corrupt.png"):
        read_items(bad)
    bad.write_text(json.dumps({"image": "corrupt.png"}) + "\n")
    with pytest.raises(DataError, match="prompt"):
        read_items(bad, check_images=False)


def test_cli_writes_pairs_and_fails_clearly(toy, judge, tmp_path, capsys):
    judge_dir, _ = judge
    out = tmp_path / "out"
    assert (
        main(
            [
                "pairs",
                "--model",
                "toy:vlm_toy",
                "--items",
                str(toy.path),
                "--judge",
                "vlm_judge",
                "--judge-args",
                f"model={judge_dir}",
                "--k",
                "2",
                "--max-new-tokens",
                "8",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    rows = read_rows(out / "pairs.jsonl").rows
    assert rows and all(r.chosen != r.rejected for r in rows)
    assert "pairs from 8 items" in capsys.readouterr().out
    cases = [
        (["--items", str(tmp_path / "missing.jsonl")], "items file not found"),
        (["--k", "1"], "argument --k: must be >= 2, got 1"),
        (["--judge", "audio_judge"], "scores audio"),
        (["--judge", "nope"], "unknown reward 'nope'"),
    ]
    for extra, msg in cases:
        argv = [
            "pairs",
            "--model",
            "toy:vlm_toy",
            "--items",
            str(toy.path),
            "--judge",
            "vlm_judge",
            "--k",
            "2",
            "--out",
            str(out),
            *extra,
        ]
        assert main(argv) == 2, extra
        assert msg in capsys.readouterr().err, extra


def test_reference_joins_the_candidates_and_judge_template_warning(toy, tmp_path):
    items = read_items(toy.path)[:2]
    score = checker(toy)
    wrong = ["purple", "seven"]  # never a right answer to a toy question
    report = build_feedback_pairs(
        StubGenerator([wrong, wrong]),
        items,
        score,
        num_samples=2,
        out_dir=tmp_path,
        include_reference=True,
        log=lambda *_: None,
    )
    rows = read_rows(report.path).rows
    assert report.pairs == 2 and [r.chosen for r in rows] == [it.reference for it in items]
    cfg = SimpleNamespace(mode="yes_no", yes_no_template='Does "{prompt}"?')
    wrapped = SimpleNamespace(name="j", modality="image", cfg=cfg)
    with pytest.warns(UserWarning, match="yes_no_template"):
        judge_scorer(wrapped)
