"""The toy VLM world: exact checker, split, the shipped tiny LLaVA, pair builder, and (slow)
DPO lowering the held-out hallucination rate."""

import json
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mmalign.toy import ASSETS as TOY_ASSETS
from mmalign.toy.vlm_world import (
    QTYPES,
    check_answer,
    eval_set,
    hallucination_rate,
    make_scene,
    question_type,
    questions_for,
    split_scenes,
    wrong_answer,
)
from mmalign.toy.world import all_captions, heldout_captions, train_captions
from tests.helpers import ROOT

VLM_TOY = TOY_ASSETS / "vlm_toy"


# ---------------------------------------------------------------- world and checker


def test_checker_accepts_ground_truth_and_rejects_perturbed_answers():
    rng = random.Random(0)
    caps = all_captions()
    seen = set()
    for _ in range(500):
        sc = make_scene(rng.choice(caps), rng.randrange(10_000))
        for qa in questions_for(sc, rng):
            seen.add(qa.qtype)
            assert check_answer(qa.question, qa.answer, sc), (sc, qa)
            assert check_answer(qa.question.upper(), f"  {qa.answer.title()}. ", sc)  # case / punctuation
            bad = wrong_answer(qa, sc, rng)
            assert not check_answer(qa.question, bad, sc), (sc, qa, bad)
    assert seen == set(QTYPES)


def test_checker_cases_by_hand():
    sc = make_scene("a red circle to the left of a blue square", 3)
    assert check_answer("What color is the circle?", "red", sc)
    assert not check_answer("what color is the square?", "red", sc)
    assert check_answer("how many squares?", "one", sc) and check_answer("how many squares?", "1", sc)
    assert check_answer("how many triangles?", "zero", sc)
    assert check_answer("is there a blue square?", "Yes.", sc) and check_answer("is there a red square?", "no", sc)
    # any true description counts: object order, and a relation only if it holds
    assert check_answer("describe the image.", "a blue square and a red circle", sc)
    assert check_answer("describe the image.", "a red circle to the left of a blue square", sc)
    assert not check_answer("describe the image.", "a blue square to the left of a red circle", sc)
    assert not check_answer("describe the image.", "a red circle", sc)  # an object left out
    assert not check_answer("describe the image.", "red circle blue", sc)  # not in the grammar
    with pytest.raises(ValueError, match="not a toy VLM question"):
        question_type("why?")


def test_hallucination_rate_per_type_and_split():
    items = eval_set("heldout", 30)
    scenes, qs = [s for s, _ in items], [q.question for _, q in items]
    truth = hallucination_rate(scenes, qs, [q.answer for _, q in items])
    assert truth["overall"] == 0 and set(QTYPES) <= set(truth)
    wrong = hallucination_rate(scenes, qs, ["purple"] * len(qs))
    assert wrong["color"] == 1 and wrong["describe"] == 1 and wrong["overall"] == 1
    assert {s.caption for s in split_scenes("heldout", 200)} <= set(heldout_captions())
    assert {s.caption for s in split_scenes("train", 200)} <= set(train_captions())
    assert eval_set("heldout", 30) == items  # fixed


# ---------------------------------------------------------------- the shipped model


def test_shipped_vlm_loads_with_auto_classes_and_answers():
    from transformers import AutoModelForImageTextToText, AutoProcessor, LlavaForConditionalGeneration

    from mmalign.toy.vlm_world import answer_questions

    size = sum(f.stat().st_size for f in VLM_TOY.iterdir())
    assert size <= 5 * 2**20
    info = json.loads((VLM_TOY / "train_info.json").read_text())
    assert {"steps", "minutes", "device", "heldout_hallucination"} <= set(info)
    model = AutoModelForImageTextToText.from_pretrained(VLM_TOY)
    proc = AutoProcessor.from_pretrained(VLM_TOY)
    assert isinstance(model, LlavaForConditionalGeneration)
    items = eval_set("heldout", 8)
    answers = answer_questions(model, proc, [s.render() for s, _ in items], [q.question for _, q in items])
    assert all(isinstance(a, str) and a for a in answers)
    rate = hallucination_rate([s for s, _ in items], [q.question for _, q in items], answers)
    assert rate["overall"] < 0.9  # it learned something (the held-out rate is in train_info.json)


def _write_pairs(tmp_path, n_scenes=6, rejected="perturbed"):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from mmalign.toy.vlm_pairs import PairRecipe, build_pairs, write_pairs

    model = AutoModelForImageTextToText.from_pretrained(VLM_TOY)
    proc = AutoProcessor.from_pretrained(VLM_TOY)
    pairs = build_pairs(model, proc, PairRecipe(rejected=rejected, n_scenes=n_scenes, samples=2))
    return pairs, write_pairs(tmp_path / "pairs", pairs)


def test_generator_loads_toy_alias_and_image_tokens_match_features(tmp_path):
    from mmalign.methods.vlm_dpo import VLMDPO, VLMDPOConfig
    from mmalign.pipelines.vlm import VLMGenerator, VLMGeneratorConfig

    gen = VLMGenerator(VLMGeneratorConfig(pretrained="toy:vlm_toy", max_new_tokens=8))
    assert Path(gen.cfg.pretrained) == VLM_TOY
    _, path = _write_pairs(tmp_path)
    method = VLMDPO(VLMDPOConfig())

    data = SimpleNamespace(path=str(path), max_samples=8, skip_bad=False)
    ds = method.build_dataset(data, gen, tmp_path, log=lambda *_: None)
    batch = ds.collate([ds[i] for i in range(len(ds))])
    seqs, where = method._sequences(batch["items"], gen)
    image_id = gen.base.config.image_token_id
    feats = gen.base.model.get_image_features(pixel_values=seqs["vision"]["pixel_values"])
    feats = feats if isinstance(feats, (torch.Tensor, list, tuple)) else feats.pooler_output
    n_feats = sum(f.reshape(-1, f.shape[-1]).shape[0] for f in (feats if isinstance(feats, (list, tuple)) else [feats]))
    assert int((seqs["input_ids"] == image_id).sum()) == n_feats == 16 * seqs["input_ids"].shape[0]
    loss, metrics = method.loss(batch, gen)
    assert torch.isfinite(loss) and metrics["implicit_acc"] == 0.5  # LoRA starts at the reference
    r = gen.rollout(["what color is the circle?"], images=[make_scene("a red circle", 0).render()], num_samples=2)
    assert len(r.samples.text) == 2


@pytest.mark.parametrize("rejected", ["self", "perturbed"])
def test_pair_builder_chosen_correct_rejected_wrong(rejected, tmp_path):
    pairs, path = _write_pairs(tmp_path, n_scenes=8, rejected=rejected)
    assert {qa.qtype for _, qa, *_ in pairs} == set(QTYPES)
    for sc, qa, chosen, rej, source in pairs:
        assert check_answer(qa.question, chosen, sc) and not check_answer(qa.question, rej, sc), (qa, rej)
        assert sc.caption in train_captions()
        assert source == "perturbed" or rejected == "self"
    if rejected == "self":  # the imperfect model's own hallucinations are most of the rejections
        assert sum(p[-1] == "policy" for p in pairs) > 0
    rows = [json.loads(l) for l in path.read_text().splitlines()]
    assert len(rows) == len(pairs) and all((path.parent / r["image"]).is_file() for r in rows)
    from mmalign.data.vlm import read_rows

    assert len(read_rows(path).rows) == len(rows)


def test_toy_configs_parse_and_name_the_toy_data():
    from mmalign.config import load_config

    for name in ("vlm_dpo", "vlm_ipo", "vlm_simpo", "vlm_mdpo"):
        cfg = load_config(ROOT / "configs" / "toy" / f"{name}.yaml")
        assert cfg.data.kind == "vlm" and cfg.data.path == "toy:vlm_pairs"
        assert Path(cfg.generator.args.pretrained) == VLM_TOY
    with pytest.raises(ValueError, match="unknown toy data"):
        from mmalign.toy.vlm_pairs import materialize

        materialize("toy:nope")


# ---------------------------------------------------------------- DPO lowers hallucination
