"""VLM adapter, collator, DPO-family method and trainer integration on tiny LLaVA / Qwen2-VL."""

import json
import math

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from mmalign.data.preference import DataError
from mmalign.data.vlm import TooLong, build_sequences, read_rows
from mmalign.media import MediaError
from mmalign.methods.vlm_dpo import VLMDPO, VLMDPOConfig
from mmalign.pipelines.vlm import VLMGenerator, VLMGeneratorConfig, VLMLoraSettings
from mmalign.testing import make_tiny_llava, make_tiny_llava_next, make_tiny_qwen2vl, make_tiny_qwen25vl
from tests.helpers import ROOT

IMAGE_TOKEN = 250


@pytest.fixture(scope="session")
def tiny_vlms(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlm_models")
    return {
        "llava": make_tiny_llava(root / "llava"),
        "qwen2vl": make_tiny_qwen2vl(root / "qwen2vl"),
        "qwen25vl": make_tiny_qwen25vl(root / "qwen25vl"),
        "llava_next": make_tiny_llava_next(root / "llava_next"),
    }


@pytest.fixture(scope="session")
def vlm_rows(tmp_path_factory):
    d = tmp_path_factory.mktemp("vlm_rows")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(4):
        Image.fromarray((rng.random((40, 50, 3)) * 255).astype("uint8")).save(d / f"{i}.png")
        rows.append(
            {
                "image": f"{i}.png",
                "prompt": f"what is in picture {i}?" + " x" * i,
                "chosen": "a red circle",
                "rejected": "a blue circle and more",
                "margin": float(i),
                "weight": 1.0,
            }
        )
    (d / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return d / "rows.jsonl"


def _gen(path, **kw):
    kw.setdefault("lora", VLMLoraSettings(rank=4, alpha=8))
    return VLMGenerator(VLMGeneratorConfig(pretrained=str(path), **kw))


class _Data:
    def __init__(self, path, skip_bad=False):
        self.path, self.max_samples, self.skip_bad = str(path), None, skip_bad


def _dataset(method, gen, path, tmp_path, skip_bad=False):
    return method.build_dataset(_Data(path, skip_bad), gen, tmp_path, log=lambda *_: None)


def _n_image_features(kind, gen, vision):
    m = gen.base.model
    if kind in ("llava", "llava_next"):  # LLaVA-NeXT: tiles packed per image, image-newline tokens included
        kw = {"image_sizes": vision["image_sizes"]} if kind == "llava_next" else {}
        feats = m.get_image_features(pixel_values=vision["pixel_values"], **kw)
        feats = feats if isinstance(feats, (torch.Tensor, list, tuple)) else feats.pooler_output
        return sum(
            f.reshape(-1, f.shape[-1]).shape[0] for f in (feats if isinstance(feats, (list, tuple)) else [feats])
        )
    merge = gen.processor.image_processor.merge_size
    return int((vision["image_grid_thw"].prod(-1) // merge**2).sum())


# --------------------------------------------------------------------------- collator


@pytest.mark.parametrize("kind", ["llava", "llava_next", "qwen2vl", "qwen25vl"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_collated_pairs_image_tokens_masking_shared_image(kind, side, tiny_vlms, vlm_rows, tmp_path):
    gen = _gen(tiny_vlms[kind], padding_side=side)
    method = VLMDPO(VLMDPOConfig())
    ds = _dataset(method, gen, vlm_rows, tmp_path)
    items = [ds[i] for i in range(len(ds))]
    seqs, where = method._sequences(items, gen)
    ids, lm = seqs["input_ids"], seqs["loss_mask"]
    n = len(items)
    # image-token count == image-feature count (one image per row, chosen and rejected)
    assert int((ids == IMAGE_TOKEN).sum()) == _n_image_features(kind, gen, seqs["vision"])
    assert ((ids == IMAGE_TOKEN).sum(1) > 0).all()
    # prompt (image tokens included) and padding are masked; the response is exactly what's scored
    assert not bool(lm[ids == IMAGE_TOKEN].any())
    assert not bool(lm[seqs["attention_mask"] == 0].any())
    for i, it in enumerate(items):
        P = len(it["prompt_enc"].ids)
        row = ids[i][seqs["attention_mask"][i].bool()]
        assert torch.equal(row[:P], it["prompt_enc"].ids)
        assert torch.equal(ids[i][lm[i].bool()], it["chosen"])
        assert torch.equal(ids[n + i][lm[n + i].bool()], it["rejected"])
        text = gen.tokenizer.decode(it["chosen"])
        assert text.startswith("a red circle")
        # chosen and rejected share the prompt and the image
        assert torch.equal(
            ids[i][seqs["attention_mask"][i].bool()][:P], ids[n + i][seqs["attention_mask"][n + i].bool()][:P]
        )
    for k, v in seqs["vision"].items():
        a, b = v.chunk(2)
        assert torch.equal(a, b), k
    if kind in ("qwen2vl", "qwen25vl"):
        tt = seqs["token_extras"]["mm_token_type_ids"]
        assert torch.equal(tt.bool(), ids == IMAGE_TOKEN)
    # the model accepts the batch (transformers checks tokens vs features itself)
    lp, mask, _ = gen.token_logps(seqs)
    assert torch.isfinite(lp).all() and lp.shape == mask.shape


@pytest.mark.parametrize("kind", ["llava", "llava_next", "qwen2vl", "qwen25vl"])
def test_left_and_right_padding_give_the_same_scores(kind, tiny_vlms, vlm_rows, tmp_path):
    scores = {}
    for side in ("right", "left"):
        gen = _gen(tiny_vlms[kind], padding_side=side)
        method = VLMDPO(VLMDPOConfig())
        ds = _dataset(method, gen, vlm_rows, tmp_path)
        with torch.no_grad():
            scores[side] = method.scores([ds[i] for i in range(len(ds))], gen)["w"]
    torch.testing.assert_close(scores["left"], scores["right"], rtol=1e-4, atol=1e-4)


def test_too_long_is_an_error_naming_the_row_or_dropped_and_counted(tiny_vlms, vlm_rows, tmp_path):
    with pytest.raises(TooLong, match=r"rows.jsonl:\d+: .*never truncated"):
        _dataset(VLMDPO(VLMDPOConfig()), _gen(tiny_vlms["llava"], max_length=83), vlm_rows, tmp_path)
    gen = _gen(tiny_vlms["llava"], max_length=83, on_too_long="drop")  # prompts 56..62 tokens, responses 14/24
    ds = _dataset(VLMDPO(VLMDPOConfig()), gen, vlm_rows, tmp_path)
    assert len(ds) == 2 and ds.rowset.too_long_dropped == 2
    for i in range(len(ds)):
        it = ds[i]
        assert len(it["prompt_enc"].ids) + max(len(it["chosen"]), len(it["rejected"])) <= 83
    # truncate_response shortens only the response; the image tokens all survive
    gen = _gen(tiny_vlms["llava"], max_length=70, on_too_long="truncate_response")
    ds = _dataset(VLMDPO(VLMDPOConfig()), gen, vlm_rows, tmp_path)
    it = ds[0]
    assert int((it["prompt_enc"].ids == IMAGE_TOKEN).sum()) == 16
    assert len(it["prompt_enc"].ids) + len(it["rejected"]) == 70 and len(it["chosen"]) == 14


def test_missing_or_corrupt_image_names_it(tiny_vlms, tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not a png")
    rows = [
        {"image": "nope.png", "prompt": "q", "chosen": "a", "rejected": "b"},
        {"image": "bad.png", "prompt": "q", "chosen": "a", "rejected": "b"},
    ]
    p = tmp_path / "rows.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows))
    gen = _gen(tiny_vlms["llava"])
    with pytest.raises(MediaError, match=r"rows.jsonl:1: image 0 .*nope.png"):
        _dataset(VLMDPO(VLMDPOConfig()), gen, p, tmp_path)
    with pytest.raises(DataError, match="no rows left"):
        _dataset(VLMDPO(VLMDPOConfig()), gen, p, tmp_path, skip_bad=True)
    Image.new("RGB", (32, 32)).save(tmp_path / "ok.png")
    p.write_text(json.dumps({"image": "ok.png", "prompt": "q", "chosen": "look: <image>", "rejected": "b"}))
    with pytest.raises(DataError, match=r"rows.jsonl:1: the response contains image/video placeholder"):
        _dataset(VLMDPO(VLMDPOConfig()), gen, p, tmp_path)
    p.write_text(json.dumps({"image": "x.png", "prompt": "q", "chosen": "a"}))
    with pytest.raises(DataError, match=r"rows.jsonl:1: missing key 'rejected'"):
        read_rows(p)


def test_rlaif_v_and_vlfeedback_column_shapes(tmp_path, vlm_rows):
    import datasets

    png = (vlm_rows.parent / "0.png").read_bytes()
    rlaif = datasets.Dataset.from_list(
        [
            {
                "image": {"bytes": png, "path": "0.png"},
                "question": "q?",
                "chosen": "yes",
                "rejected": "no",
                "ds_name": "x",
            }
        ]
    )
    rlaif.to_parquet(str(tmp_path / "rlaif.parquet"))
    rs = read_rows(tmp_path / "rlaif.parquet")
    assert (rs.rows[0].prompt, rs.rows[0].chosen, rs.rows[0].rejected) == ("q?", "yes", "no")
    vlf = [
        {
            "image": str(vlm_rows.parent / "0.png"),
            "prompt": "p",
            "completions": [
                {
                    "response": "mid",
                    "annotations": {"Helpfulness": {"Rating": "3"}, "Visual Faithfulness": {"Rating": "3"}},
                },
                {
                    "response": "best",
                    "annotations": {"Helpfulness": {"Rating": "5"}, "Visual Faithfulness": {"Rating": "4"}},
                },
                {
                    "response": "worst",
                    "annotations": {"Helpfulness": {"Rating": "1"}, "Visual Faithfulness": {"Rating": "2"}},
                },
            ],
        },
        {
            "image": "0.png",
            "prompt": "tie",
            "completions": [
                {"response": "a", "annotations": {"H": {"Rating": "3"}}},
                {"response": "b", "annotations": {"H": {"Rating": "3"}}},
            ],
        },
    ]
    (tmp_path / "vlf.jsonl").write_text("\n".join(json.dumps(r) for r in vlf))
    rs = read_rows(tmp_path / "vlf.jsonl")
    assert len(rs.rows) == 1 and rs.ties_dropped == 1
    assert (rs.rows[0].chosen, rs.rows[0].rejected, rs.rows[0].margin) == ("best", "worst", 3.0)


# --------------------------------------------------------------------------- method


@pytest.mark.parametrize("kind", ["llava", "llava_next", "qwen2vl", "qwen25vl"])
def test_cached_reference_equals_live(kind, tiny_vlms, vlm_rows, tmp_path):
    gen = _gen(tiny_vlms[kind])
    with torch.no_grad():  # make the policy differ from the reference
        for n, p in gen.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    for lt, extra in (("dpo", {"dense_gamma": 5.0}), ("mdpo", {})):
        live = VLMDPO(VLMDPOConfig(loss_type=lt, **extra))
        cached = VLMDPO(VLMDPOConfig(loss_type=lt, reference="cached", reference_cache=str(tmp_path / lt), **extra))
        ds_live = _dataset(live, gen, vlm_rows, tmp_path)
        ds_cached = _dataset(cached, gen, vlm_rows, tmp_path)
        assert ds_cached.ref is not None and "w" in ds_cached.ref
        b_live = ds_live.collate([ds_live[i] for i in range(4)])
        b_cached = ds_cached.collate([ds_cached[i] for i in range(4)])
        assert "ref" in b_cached and "ref" not in b_live
        with torch.no_grad(), gen.reference():
            ref = live.scores(b_live["items"], gen)
        for k in b_cached["ref"]:
            torch.testing.assert_close(b_cached["ref"][k], ref[k], rtol=1e-5, atol=1e-5)
        with torch.no_grad():
            l1, m1 = live.loss(b_live, gen)
            l2, m2 = cached.loss(b_cached, gen)
        assert abs(float(l1) - float(l2)) < 1e-5 and m1["margin"] != 0


def _train(gen, method, batch, steps=4, lr=5e-3):
    params = [p for p in gen.trainable().parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    hist = []
    for _ in range(steps):
        loss, m = method.loss(batch, gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        hist.append(m)
    return hist


@pytest.mark.parametrize("kind", ["llava", "llava_next", "qwen2vl", "qwen25vl"])
def test_trainable_parameters_change_frozen_ones_do_not(kind, tiny_vlms, vlm_rows, tmp_path):
    gen = _gen(tiny_vlms[kind], train_projector=True)
    names = {n for n, p in gen.model.named_parameters() if p.requires_grad}
    assert any("lora_" in n for n in names) and any("modules_to_save" in n for n in names)
    vision = gen.vision_modules[0].rsplit(".", 1)[-1]
    assert not any(vision in n and "lora_" in n for n in names), "LoRA must stay off the vision tower"
    before = {n: p.detach().clone() for n, p in gen.model.named_parameters()}
    method = VLMDPO(VLMDPOConfig(beta=0.5))
    ds = _dataset(method, gen, vlm_rows, tmp_path)
    _train(gen, method, ds.collate([ds[0], ds[1]]), steps=3)
    for n, p in gen.model.named_parameters():
        if n in names:
            assert not torch.equal(p, before[n]), f"trainable {n} did not change"
        else:
            assert torch.equal(p, before[n]), f"frozen {n} changed"


@pytest.mark.parametrize(
    "loss_type,extra",
    [
        ("dpo", {}),
        ("ipo", {}),
        ("simpo", {}),
        ("dpo", {"dense_gamma": 5.0}),
        ("mdpo", {}),
        ("dpo", {"dynamic_beta": True}),
    ],
)
def test_a_few_steps_raise_the_chosen_vs_rejected_margin(loss_type, extra, tiny_vlms, vlm_rows, tmp_path):
    """A sign error anywhere (scores, loss, reference) makes the margin fall instead."""
    gen = _gen(tiny_vlms["llava"])
    method = VLMDPO(VLMDPOConfig(loss_type=loss_type, beta=0.5, **extra))
    ds = _dataset(method, gen, vlm_rows, tmp_path)
    batch = ds.collate([ds[0]])
    hist = _train(gen, method, batch, steps=5)
    with torch.no_grad():
        _, m = method.loss(batch, gen)
    assert m["margin"] > hist[0]["margin"] + 1e-3, (hist[0], m)
    assert m["implicit_acc"] == 1.0


def test_kto_unpaired_moves_rewards_the_right_way(tiny_vlms, vlm_rows, tmp_path):
    rows = [
        {
            "image": str(vlm_rows.parent / f"{i}.png"),
            "prompt": "q",
            "completion": "good" if i % 2 else "bad",
            "label": bool(i % 2),
        }
        for i in range(4)
    ]
    p = tmp_path / "kto.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows))
    gen = _gen(tiny_vlms["llava"])
    method = VLMDPO(VLMDPOConfig(loss_type="kto", beta=0.5))
    ds = _dataset(method, gen, p, tmp_path)
    batch = ds.collate([ds[i] for i in range(4)])
    _train(gen, method, batch, steps=5)
    with torch.no_grad():
        _, m = method.loss(batch, gen)
    assert m["reward_desirable"] > 0 > m["reward_undesirable"]
    with pytest.raises(ValueError, match="loss_type: kto"):
        _dataset(VLMDPO(VLMDPOConfig()), gen, p, tmp_path)


def test_povid_and_orpo_run_and_rollout_samples_k(tiny_vlms, vlm_rows, tmp_path):
    gen = _gen(tiny_vlms["qwen2vl"], max_new_tokens=4)
    for lt in ("povid", "orpo"):
        method = VLMDPO(VLMDPOConfig(loss_type=lt, povid_max_new_tokens=4))
        ds = _dataset(method, gen, vlm_rows, tmp_path)
        loss, m = method.loss(ds.collate([ds[0], ds[1]]), gen)
        loss.backward()
        assert math.isfinite(float(loss.detach())), lt
    ro = gen.rollout(["what?", "where?"], images=[str(vlm_rows.parent / "0.png")] * 2, num_samples=3, seeds=[0])
    assert len(ro.samples.text) == 6 and ro.prompts[:3] == ["what?"] * 3
    assert all(0 < len(x) <= 4 for x in ro.extras["response_ids"])
    assert ro.extras["group"].tolist() == [0, 0, 0, 1, 1, 1]


# --------------------------------------------------------------------------- trainer


def test_trainer_end_to_end_from_yaml(tiny_vlms, vlm_rows, tmp_path):
    from mmalign.config import load_config
    from mmalign.trainer import Trainer

    cfg = {
        "run": {"name": "vlm", "seed": 0, "output_dir": str(tmp_path / "run")},
        "generator": {
            "name": "vlm",
            "pretrained": str(tiny_vlms["llava"]),
            "lora": {"rank": 4, "alpha": 8},
            "max_length": 128,
        },
        "method": {"name": "vlm_dpo", "loss_type": "dpo", "beta": 0.5, "reference": "cached"},
        "data": {"kind": "vlm", "path": str(vlm_rows)},
        "train": {"steps": 3, "batch_size": 2, "lr": 5e-3, "gradient_checkpointing": True},
        "eval": {"enabled": False},
    }
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(cfg))
    tr = Trainer(load_config(p))
    summary = tr.fit()
    assert summary["steps"] == 3
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "loss" in r]
    assert len(steps) == 3 and all(math.isfinite(r["loss"]) for r in steps)
    assert (tmp_path / "run" / "reference_logps" / "reference.safetensors").is_file()
    final = tmp_path / "run" / "final"
    assert (final / "adapter_model.safetensors").is_file()
    # the saved adapter loads back into a fresh generator and reproduces the trained scores
    g2 = _gen(tiny_vlms["llava"], max_length=128)
    g2.load_trained(final)
    sd1, sd2 = tr.generator.trainable_state_dict(), g2.trainable_state_dict()
    assert sd1.keys() == sd2.keys() and all(torch.equal(sd1[k].cpu(), sd2[k]) for k in sd1)


def test_shipped_vlm_configs_parse():

    from mmalign.config import config_from_dict

    files = sorted(ROOT.joinpath("configs", "vlm").glob("*.yaml"))
    assert files
    for f in files:
        data = yaml.safe_load(f.read_text())
        data["data"]["path"] = __file__  # the real data is not here; everything else must validate
        cfg = config_from_dict(data, source=str(f))
        assert cfg.generator.name == "vlm" and cfg.method.name == "vlm_dpo"


@pytest.mark.parametrize("kind", ["llava", "llava_next", "qwen2vl", "qwen25vl"])
def test_scores_equal_the_models_own_label_loss(kind, tiny_vlms, vlm_rows, tmp_path):
    """Summed / averaged response log-prob == -(transformers' label cross-entropy) x tokens, with
    labels = input ids on the response only: pins the score's sign, shift and masking."""
    gen = _gen(tiny_vlms[kind])
    ds = _dataset(VLMDPO(VLMDPOConfig()), gen, vlm_rows, tmp_path)
    items = [ds[i] for i in range(2)]
    for score in ("sum", "mean"):
        method = VLMDPO(VLMDPOConfig(score=score))
        with torch.no_grad():
            got = method.scores(items, gen)
        for i, it in enumerate(items):
            seqs = build_sequences([it["prompt_enc"]], [it["rejected"]], gen.pad_id)
            inp = gen._model_inputs(seqs, gen.model)
            labels = torch.where(seqs["loss_mask"].bool(), seqs["input_ids"], torch.full_like(seqs["input_ids"], -100))
            with torch.no_grad(), gen.reference():
                ce = float(gen.base(**inp, labels=labels).loss)
            n = len(it["rejected"])
            want = -ce * n if score == "sum" else -ce
            assert float(got["l"][i]) == pytest.approx(want, rel=1e-4, abs=1e-4)
