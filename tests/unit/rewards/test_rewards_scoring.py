"""`mmalign score` / `mmalign eval-judge` (mmalign/cli/, mmalign/scoring.py) on files written here."""

from __future__ import annotations

import json

import pytest
import torch

from mmalign import scoring
from mmalign.cli import main
from mmalign.media import save_wav, tensor_to_pil
from mmalign.rewards import fixtures as fx
from mmalign.rewards.common import build_reward
from mmalign.types import Samples

fx.register_test_rewards()


def score(*argv):
    return main(["score", *[str(a) for a in argv]])


def eval_judge(*argv):
    return main(["eval-judge", *[str(a) for a in argv]])


def write_images(d, values, size=16):
    d.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, v in enumerate(values):
        p = d / f"img{i}.png"
        tensor_to_pil(torch.full((3, size, size), float(v))).save(p)
        paths.append(p)
    return paths


def test_list_shows_every_reward_with_modality(capsys):
    assert score("--list") == 0
    out = capsys.readouterr().out
    for name in (
        "clip_hf",
        "hps",
        "pickscore",
        "aesthetic",
        "vlm_judge",
        "audio_judge",
        "clap",
        "mix",
        "ensemble",
        "video_from_image",
        "jpeg_compressibility",
        "toy_gold",
    ):
        assert name in out
    assert "modality" in out and "differentiable" in out and "loads" in out


def test_score_images_writes_jsonl_and_summary(tmp_path, capsys):
    paths = write_images(tmp_path / "img", [0.2, 0.4, 0.6])
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a\nb\nc\n")
    out = tmp_path / "scores.jsonl"
    rc = score(
        "--reward",
        "mix",
        "--reward-args",
        "rewards=[{name: test_mean_pixel, scale: 2.0}, {name: jpeg_compressibility}]",
        "weights=[1.0, 0.0]",
        "--prompts",
        prompts,
        "--out",
        out,
        "--batch-size",
        2,
        *paths,
    )
    assert rc == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["a", "b", "c"] and [r["path"] for r in rows] == [str(p) for p in paths]
    want = [2 * round(v * 255) / 255 for v in (0.2, 0.4, 0.6)]
    assert [r["score"] for r in rows] == pytest.approx(want, abs=1e-6)
    text = capsys.readouterr().out
    assert "mean" in text and "std" in text and "min" in text and "max" in text
    assert f"{sum(want) / 3:.4f}" in text


def test_reward_args_are_validated_by_the_config_dataclass(tmp_path, capsys):
    (p,) = write_images(tmp_path, [0.5])
    assert score("--reward", "jpeg_compressibility", "--reward-args", "qualityy=90", p) == 2
    assert "reward.qualityy: unknown key (allowed: quality)" in capsys.readouterr().err
    assert score("--reward", "jpeg_compressibility", "--reward-args", "quality=high", p) == 2
    assert "reward.quality: expected an integer, got 'high'" in capsys.readouterr().err
    assert score("--reward", "nope", p) == 2
    assert "unknown reward 'nope'" in capsys.readouterr().err


def test_corrupt_or_missing_media_names_the_file(tmp_path, capsys):
    (good,) = write_images(tmp_path, [0.5])
    bad = tmp_path / "broken.png"
    bad.write_bytes(good.read_bytes()[:40])
    assert score("--reward", "jpeg_compressibility", good, bad) == 2
    assert "broken.png: not a readable image" in capsys.readouterr().err
    assert score("--reward", "jpeg_compressibility", tmp_path / "gone.png") == 2
    assert "gone.png: file not found" in capsys.readouterr().err
    wav = tmp_path / "a.wav"
    save_wav(wav, torch.zeros(1, 100), 16000)
    assert score("--reward", "jpeg_compressibility", wav) == 2
    assert "a.wav: is audio, but the reward scores image" in capsys.readouterr().err


def test_score_audio_with_clap_and_video_frames_with_a_config_file(tmp_path):
    clap_dir = fx.tiny("clap")["model"]
    a = 0.3 * torch.randn(2, 1, 8000, generator=torch.Generator().manual_seed(0))
    wavs = []
    for i in range(2):
        wavs.append(tmp_path / f"s{i}.wav")
        save_wav(wavs[-1], a[i], 16000)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(json.dumps({"path": w.name, "prompt": f"sound {i}"}) for i, w in enumerate(wavs)))
    out = tmp_path / "audio.jsonl"
    assert score("--reward", "clap", "--reward-args", f"model={clap_dir}", "--manifest", manifest, "--out", out) == 0
    got = [json.loads(line)["score"] for line in out.read_text().splitlines()]
    from mmalign.media import load_audio

    loaded = torch.stack([load_audio(w)[0] for w in wavs])
    direct = build_reward({"name": "clap", "model": clap_dir}, "r")(
        Samples(audio=loaded, sample_rate=16000), ["sound 0", "sound 1"]
    )
    assert got == pytest.approx(direct.tolist(), rel=1e-5)

    frames = tmp_path / "video0"
    write_images(frames, [0.0, 0.2, 0.4, 0.6])
    cfg = tmp_path / "reward.yaml"
    cfg.write_text("reward:\n  name: video_from_image\n  image_reward: {name: test_mean_pixel}\n  frames: all\n")
    out = tmp_path / "video.jsonl"
    assert score("--config", cfg, "--prompt", "moving", "--out", out, frames) == 0
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["score"] == pytest.approx(sum(round(v * 255) / 255 for v in (0.0, 0.2, 0.4, 0.6)) / 4, abs=1e-6)


def test_agreement_counts_ties_as_mj_bench_does():
    a = scoring.agreement([1.0, -1.0, 0.0, 2.0])
    assert a == {"n": 4, "acc_with_ties": 0.5, "acc_without_ties": pytest.approx(2 / 3), "tie_rate": 0.25}
    assert scoring.agreement([0.05, -0.2], tie_eps=0.1)["tie_rate"] == 0.5


def test_eval_judge_per_category_and_mj_bench_rows(tmp_path, capsys):
    img = tmp_path / "img"
    p = write_images(img, [0.9, 0.1, 0.3, 0.6, 0.5, 0.5])
    rows = [
        {"prompt": "x", "chosen": "img/img0.png", "rejected": "img/img1.png", "category": "quality"},  # right
        {"prompt": "x", "chosen": "img/img2.png", "rejected": "img/img3.png", "category": "quality"},  # wrong
        {"prompt": "x", "chosen": "img/img4.png", "rejected": "img/img5.png", "category": "alignment"},  # tie
        {"caption": "x", "image0": "img/img1.png", "image1": "img/img0.png", "label": 1, "category": "alignment"},
        {"caption": "x", "image0": "img/img1.png", "image1": "img/img0.png", "label": "tie", "category": "alignment"},
    ]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "judged.jsonl"
    assert eval_judge("--reward", "test_mean_pixel", "--pairs", pairs, "--out", out) == 0
    text = capsys.readouterr().out
    assert "human ties skipped: 1" in text
    lines = {
        ln.split()[0]: ln.split()[1:]
        for ln in text.splitlines()
        if ln.split() and ln.split()[0] in ("quality", "alignment", "overall")
    }
    assert lines["quality"][:3] == ["2", "0.5000", "0.5000"]
    assert lines["alignment"][:4] == ["2", "0.5000", "1.0000", "0.5000"]
    assert lines["overall"][:4] == ["4", "0.5000", "0.6667", "0.2500"]
    assert len(out.read_text().splitlines()) == 4
    assert len(p) == 6


def test_eval_judge_pairwise_with_a_vlm_judge(tmp_path, capsys):
    write_images(tmp_path / "img", [0.9, 0.1], size=32)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "a red circle", "chosen": "img/img0.png", "rejected": "img/img1.png"}))
    d = fx.tiny("llava")["model"]
    assert eval_judge("--reward", "vlm_judge", "--reward-args", f"model={d}", "--pairwise", "--pairs", pairs) == 0
    assert "overall" in capsys.readouterr().out
    assert eval_judge("--reward", "jpeg_compressibility", "--pairwise", "--pairs", pairs) == 2
    assert "has no prefer(a, b)" in capsys.readouterr().err


def test_both_orders_agreement_hand_computed():
    # pair i shown (chosen, rejected): P(first) cf[i]; shown (rejected, chosen): P(first) rf[i]
    a = scoring.both_orders_agreement([0.9, 0.8, 0.5], [0.7, 0.2, 0.4])
    # answers' chosen-minus-rejected margins .4 .3 0 | -.2 .3 .1: 4 right, 1 wrong, 1 tie of 6
    assert a["n"] == 3 and a["acc_with_ties"] == pytest.approx(4 / 6) and a["acc_without_ties"] == pytest.approx(4 / 5)
    assert a["tie_rate"] == pytest.approx(1 / 6)
    assert a["position_bias"] == pytest.approx(3 / 5)  # first-shown picked in 3 of the 5 decided answers
    assert scoring.both_orders_agreement([1.0, 1.0], [1.0, 1.0])["position_bias"] == 1.0
    assert scoring.both_orders_agreement([1.0, 1.0], [0.0, 0.0])["position_bias"] == 0.5


def _register_stub_judges():
    """`test_first_judge` always answers "first" (P(first better) = 1, in whatever order it is
    asked: no swap averaging); `test_bright_judge` is right for pairs whose chosen image is the
    brighter: P(first better) = sigmoid(50 (mean(first) - mean(second)))."""
    from dataclasses import dataclass

    from mmalign import registry

    if "test_first_judge" in registry.REWARDS:
        return

    @dataclass
    class StubConfig:
        pass

    class Stub:
        modality, differentiable = "image", False

        def __init__(self, name, fn):
            self.name, self.fn = name, fn

        def __call__(self, samples, prompts):
            raise AssertionError("eval-judge --pairwise must not score single samples")

        def prefer(self, a, b, prompts):
            return self.fn(a.images.flatten(1).mean(1), b.images.flatten(1).mean(1))

    for name, fn in (
        ("test_first_judge", lambda ma, mb: torch.ones_like(ma)),
        ("test_bright_judge", lambda ma, mb: torch.sigmoid(50 * (ma - mb))),
    ):

        def build(cfg, name=name, fn=fn):
            """Test pairwise judge."""
            return Stub(name, fn)

        build.modality, build.differentiable, build.loads = "image", False, "nothing (test judge)"
        registry.register_reward(name, StubConfig)(build)


def _bright_pairs(tmp_path):
    write_images(tmp_path / "img", [0.9, 0.1, 0.7, 0.3, 0.6, 0.2], size=16)
    pairs = tmp_path / "pairs.jsonl"
    rows = [{"prompt": "x", "chosen": f"img/img{2 * i}.png", "rejected": f"img/img{2 * i + 1}.png"} for i in range(3)]
    pairs.write_text("\n".join(json.dumps(r) for r in rows))
    return pairs


def _overall(text):
    head = next(ln.split() for ln in text.splitlines() if ln.split()[:1] == ["category"])
    row = next(ln.split() for ln in text.splitlines() if ln.split()[:1] == ["overall"])
    return dict(zip(head, row))


def test_eval_judge_pairwise_shows_both_orders_and_reports_position_bias(tmp_path, capsys):
    """A judge that always answers "first" agrees on half the answers with position bias 1.0
    (shown chosen-first only, it would score 100%); a right judge agrees on all with bias 0.5."""
    _register_stub_judges()
    pairs, out = _bright_pairs(tmp_path), tmp_path / "judged.jsonl"
    assert eval_judge("--reward", "test_first_judge", "--pairwise", "--pairs", pairs, "--out", out) == 0
    row = _overall(capsys.readouterr().out)
    assert row["n"] == "3" and row["acc_with_ties"] == "0.5000" and row["position_bias"] == "1.0000"
    lines = [json.loads(ln) for ln in out.read_text().splitlines()]
    assert [(r["p_first_chosen_first"], r["p_first_rejected_first"], r["p_chosen"]) for r in lines] == [(1, 1, 0.5)] * 3
    assert eval_judge("--reward", "test_bright_judge", "--pairwise", "--pairs", pairs) == 0
    row = _overall(capsys.readouterr().out)
    assert row["acc_with_ties"] == row["acc_without_ties"] == "1.0000" and row["position_bias"] == "0.5000"


def test_eval_judge_pairwise_asks_a_vlm_judge_one_order_at_a_time(tmp_path, capsys, monkeypatch):
    """A real VLM judge whose next-token distribution always says "1": eval-judge asks each order
    separately (prefer_first), so it reads 50% and bias 1.0, while the judge's own prefer()
    (swap_average, the default) gives exactly no preference."""
    from mmalign.rewards._judge import ChatJudge

    def always_one(self, texts, media_kwargs):
        logp = torch.full((len(texts), len(self.tokenizer)), -30.0)
        logp[:, self.answer_id("1")] = 0.0
        return logp

    monkeypatch.setattr(ChatJudge, "next_token_logprobs", always_one)
    d = fx.tiny("llava")["model"]
    pairs = _bright_pairs(tmp_path)
    assert eval_judge("--reward", "vlm_judge", "--reward-args", f"model={d}", "--pairwise", "--pairs", pairs) == 0
    row = _overall(capsys.readouterr().out)
    assert row["acc_with_ties"] == "0.5000" and row["position_bias"] == "1.0000"
    judge = build_reward({"name": "vlm_judge", "model": d}, "reward")
    a, b = Samples(images=torch.rand(2, 3, 32, 32)), Samples(images=torch.rand(2, 3, 32, 32))
    torch.testing.assert_close(judge.prefer(a, b, ["x", "y"]), torch.full((2,), 0.5))
    assert (judge.prefer_first(a, b, ["x", "y"]) > 0.999).all()
