"""Audiobox Aesthetics reward (rewards/audiobox.py) on tiny WavLMs: checked against outputs of the
original package (tests/fixtures/audiobox, written by scripts/make_audiobox_reference.py with
audiobox_aesthetics 0.0.4), plus windows, resampling, de-normalisation and errors."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from mmalign import registry
from mmalign.config import ConfigError
from mmalign.rewards import fixtures as fx
from mmalign.rewards.audiobox import AXES, convert_state_dict, frame_padding_mask, original_state_dict
from mmalign.rewards.clap import resample
from mmalign.rewards.common import build_reward
from mmalign.types import Samples
from tests.helpers import ROOT

FIXTURES = ROOT / "tests" / "fixtures" / "audiobox"
EXPECTED = json.loads((FIXTURES / "expected.json").read_text())


def build(**args):
    return build_reward({"name": "audiobox_aesthetics", **args}, "reward")


_BUILT: dict = {}


def cached(**args):
    key = tuple(sorted((k, repr(v)) for k, v in args.items()))
    if key not in _BUILT:
        _BUILT[key] = build(**args)
    return _BUILT[key]


def tiny(**args):
    return cached(**fx.tiny("audiobox"), **args)


def reference_wave(**spec) -> torch.Tensor:
    """The generator script's deterministic waveforms (one definition for both sides)."""
    path = ROOT / "scripts" / "make_audiobox_reference.py"
    mod_spec = importlib.util.spec_from_file_location("make_audiobox_reference", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod.reference_wave(**spec)


def audio(b=2, sr=16000, seconds=1.0, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return 0.3 * torch.randn(b, 1, int(sr * seconds), generator=g, dtype=dtype)


# --------------------------------------------------------------------------- the original


@pytest.mark.parametrize("which,model", [("a", "checkpoint_a.pt"), ("b", "hub_b")])
def test_matches_the_original_package(which, model):
    """Model A: checkpoint.pt layout, one-layer heads. Model B: save_pretrained layout (config.json +
    model.safetensors), two-layer heads with LayerNorm, normalize_embed=False. Inputs: 1.5 s mono and
    12.5 s stereo at 22.05 kHz (two windows, the second partial), 0.8 s at 16 kHz."""
    r = cached(model=str(FIXTURES / model), wavlm=EXPECTED["tiny_wavlm"])
    exp = EXPECTED["results"][which]
    inputs = EXPECTED["inputs"]
    waves = [reference_wave(**spec) for spec in inputs]
    got = r.predict(waves[:2], 22050)
    got3 = r.predict(waves[2:], inputs[2]["sample_rate"])
    for i, row in enumerate(exp["scores"]):
        for axis in AXES:
            ours = (got[axis][i] if i < 2 else got3[axis][0]).item()
            assert ours == pytest.approx(row[axis], rel=1e-5, abs=1e-4), (which, i, axis)
    # the normalised per-window predictions of the original's model, on the same windows
    mono = [resample(w.mean(0), s["sample_rate"], 16000) for w, s in zip(waves, inputs)]
    chunks, lengths, owner = r.windows(mono)
    assert owner.tolist() == exp["windows"]["sample"]
    assert (lengths / r.window).tolist() == pytest.approx(exp["windows"]["weights"])
    with torch.no_grad():
        raw = r.model(chunks, lengths)
    for axis in AXES:
        torch.testing.assert_close(raw[axis], torch.tensor(exp["windows"][axis]), rtol=1e-5, atol=1e-4)
    # through __call__ (Samples), one axis and a weighted mix
    w0 = waves[0][None]
    assert r(Samples(audio=w0, sample_rate=22050)).item() == pytest.approx(exp["scores"][0]["PQ"], rel=1e-5, abs=1e-4)
    mix = cached(model=str(FIXTURES / model), wavlm=EXPECTED["tiny_wavlm"], axis_weights={"CE": 1.0, "PC": -0.5})
    want = exp["scores"][0]["CE"] - 0.5 * exp["scores"][0]["PC"]
    assert mix(Samples(audio=w0, sample_rate=22050), None).item() == pytest.approx(want, rel=1e-5, abs=1e-4)


def test_key_mapping_round_trips_and_names_unknown_keys():
    ckpt = torch.load(FIXTURES / "checkpoint_a.pt", weights_only=True)
    sd = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()}
    ours = convert_state_dict(sd)
    assert "wavlm.encoder.layers.0.attention.rel_attn_embed.weight" in ours
    assert "wavlm.encoder.pos_conv_embed.conv.parametrizations.weight.original0" in ours
    back = original_state_dict(ours)
    assert set(back) == set(sd) - {"wavlm_model.mask_emb"}
    msg = r"ckpt.pt: not an Audiobox Aesthetics checkpoint: unexpected keys \['wavlm_model.foo'\]"
    with pytest.raises(ValueError, match=msg):
        convert_state_dict({**sd, "wavlm_model.foo": torch.zeros(1)}, "ckpt.pt")


# --------------------------------------------------------------------------- behaviour


def test_registered_listed_and_returns_finite_batch():
    from mmalign.scoring import list_rewards

    entry = registry.lookup("reward", "audiobox_aesthetics")
    assert entry.build.modality == "audio" and entry.doc
    row = next(r for r in list_rewards() if r["name"] == "audiobox_aesthetics")
    assert row["modality"] == "audio"
    r = tiny()
    a = audio(3, seconds=0.5)
    s = r(Samples(audio=a, sample_rate=16000), ["x", "y", "z"])
    assert s.shape == (3,) and torch.isfinite(s).all()
    one = torch.cat([r(Samples(audio=a[i : i + 1], sample_rate=16000)) for i in range(3)])
    torch.testing.assert_close(s, one, rtol=1e-5, atol=1e-5)
    axes = r.axes(Samples(audio=a, sample_rate=16000))
    assert set(axes) == set(AXES)
    torch.testing.assert_close(s, axes["PQ"])  # default axis


def test_mmalign_score_on_wav_files_of_different_lengths_and_rates(tmp_path):
    import yaml

    from mmalign.cli import main
    from mmalign.media import load_audio, save_wav

    a, b = audio(1, sr=22050, seconds=0.9, seed=5)[0], audio(1, sr=16000, seconds=10.5, seed=6)[0]
    save_wav(tmp_path / "a.wav", a, 22050)
    save_wav(tmp_path / "b.wav", b, 16000)
    out = tmp_path / "scores.jsonl"
    args = [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip()}" for k, v in fx.tiny("audiobox").items()]
    argv = [
        "--reward",
        "audiobox_aesthetics",
        "--reward-args",
        *args,
        "axis=CE",
        "--out",
        out,
        "--",
        tmp_path / "a.wav",
        tmp_path / "b.wav",
    ]
    assert main(["score", *[str(x) for x in argv]]) == 0
    got = [json.loads(line)["score"] for line in out.read_text().splitlines()]
    r = tiny()
    want = [r.predict([load_audio(tmp_path / f)[0]], sr)["CE"].item() for f, sr in (("a.wav", 22050), ("b.wav", 16000))]
    assert got == pytest.approx(want, rel=1e-5)


def test_resamples_to_16k():
    import torchaudio

    r = tiny()
    a = audio(2, sr=22050, seconds=0.6)
    s = r(Samples(audio=a, sample_rate=22050))
    by_hand = torchaudio.functional.resample(a, 22050, 16000)
    torch.testing.assert_close(s, r(Samples(audio=by_hand, sample_rate=16000)), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(s, r(Samples(audio=a, sample_rate=16000)), atol=1e-4)  # the rate matters
    stereo = torch.cat([a, -a], 1)  # channels are averaged: +a and -a cancel to silence
    silence = torch.zeros_like(a)
    torch.testing.assert_close(
        r(Samples(audio=stereo, sample_rate=22050)), r(Samples(audio=silence, sample_rate=22050))
    )


def test_long_audio_is_scored_in_weighted_10s_windows():
    r = tiny()
    wave = audio(1, seconds=23.0)[0, 0]  # windows: [0, 10) s, [10, 20) s, [20, 23) s (zero-padded to 10 s)
    chunks, lengths, owner = r.windows([wave])
    assert chunks.shape == (3, 160000) and lengths.tolist() == [160000, 160000, 48000] and owner.tolist() == [0, 0, 0]
    assert (chunks[2, 48000:] == 0).all() and torch.equal(chunks[2, :48000], wave[320000:])
    axes = r.predict([wave], 16000)
    parts = [r.predict([wave[i : i + 160000]], 16000) for i in (0, 160000, 320000)]
    for axis in AXES:  # score = sum_i w_i s_i / sum_i w_i, w_i = valid / 10 s
        want = (parts[0][axis] + parts[1][axis] + 0.3 * parts[2][axis]) / 2.3
        torch.testing.assert_close(axes[axis], want, rtol=1e-5, atol=1e-5)
    # the window and hop are configurable (the original fixes 10 s / 10 s)
    short = tiny(window_s=1.0, hop_s=0.5)
    _, lengths, _ = short.windows([wave[:40000]])
    assert lengths.tolist() == [16000, 16000, 16000, 16000, 8000]  # starts every 0.5 s, last one partial


def test_frame_mask_follows_fairseq():
    # 160000 samples -> 499 frames: drop 160000 % 499 = 321 samples, blocks of 320; a frame is valid
    # when any of its samples is, so 24000 valid samples -> ceil(24000 / 320) = 75 frames
    pad = frame_padding_mask(torch.tensor([24000, 160000, 1]), 160000, 499)
    assert (~pad).sum(1).tolist() == [75, 499, 1]


def test_denormalisation_and_head_formula_by_hand():
    r = tiny()
    cfg = json.loads((Path(fx.tiny("audiobox")["model"]) / "config.json").read_text())
    assert r.target_transform == {k: (v["mean"], v["std"]) for k, v in cfg["target_transform"].items()}
    waves = [audio(1, seconds=12.0, seed=3)[0, 0], audio(1, seconds=0.7, seed=4)[0, 0]]
    got = r.predict(waves, 16000)
    chunks, lengths, owner = r.windows(waves)
    with torch.no_grad():
        hidden, keep = r.model.hidden_states(chunks, lengths)  # [N, F, C, L]
    h, m = hidden.double(), keep.double()
    for axis in AXES:
        a = r.model.layer_weights[axis].double()
        w = torch.exp(a) / torch.exp(a).sum()
        e = (h * w).sum(-1)
        e = (e * m[..., None]).sum(1) / m.sum(1, keepdim=True)
        e = e / e.norm(dim=-1, keepdim=True)
        lin = r.model.proj_layer[axis][0]
        y = e @ lin.weight.double()[0] + lin.bias.double()[0]  # normalised prediction per window
        mean, std = cfg["target_transform"][axis]["mean"], cfg["target_transform"][axis]["std"]
        s = y * std + mean  # de-normalised
        wt = lengths.double() / 160000
        want = torch.stack([(s[owner == b] * wt[owner == b]).sum() / wt[owner == b].sum() for b in range(2)])
        torch.testing.assert_close(got[axis].double(), want, rtol=1e-5, atol=1e-5)


def test_differentiable_finite_difference_float64():
    r = tiny(dtype="float64")
    x0 = audio(1, seconds=0.25, dtype=torch.float64)

    def f(x):
        return r(Samples(audio=x, sample_rate=16000))

    v = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x = x0.clone().requires_grad_(True)
    f(x).sum().backward()
    analytic = (x.grad * v).sum().item()
    with torch.no_grad():
        numeric = ((f(x0 + 1e-6 * v) - f(x0 - 1e-6 * v)).sum() / 2e-6).item()
    assert math.isfinite(analytic) and abs(analytic) > 0
    assert analytic == pytest.approx(numeric, rel=1e-4)


# --------------------------------------------------------------------------- errors


def test_errors_are_clear(tmp_path):
    r = tiny()
    with pytest.raises(TypeError, match="audiobox_aesthetics.*scores audio samples, but got image"):
        r(Samples(images=torch.rand(1, 3, 8, 8)))
    with pytest.raises(ValueError, match="sample_rate is not set"):
        r(Samples(audio=audio(1)))
    missing = tmp_path / "nowhere" / "checkpoint.pt"
    with pytest.raises(ConfigError, match=f"model: {missing}"):
        build(model=str(missing))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'empty' / 'config.json'} not found"):
        build(model=str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="axis_weights.XX: unknown axis"):
        build(**fx.tiny("audiobox"), axis_weights={"XX": 1.0})
    with pytest.raises(ConfigError, match="wavlm.gru_rel_pos: only True is supported"):
        build(model=fx.tiny("audiobox")["model"], wavlm={**fx.TINY_WAVLM, "gru_rel_pos": False})
    with pytest.raises(ValueError, match="nth_layer=3 .* encoder_layers \\+ 1 = 13"):  # tiny weights, no `wavlm`
        build(model=fx.tiny("audiobox")["model"])
    bad = tmp_path / "bad.pt"
    torch.save(
        {
            "state_dict": {"model.wavlm_model.nope": torch.zeros(1)},
            "target_transform": fx.AUDIOBOX_TARGETS,
            "model_cfg": {"nth_layer": 3},
        },
        bad,
    )
    with pytest.raises(ValueError, match=f"{bad}: not an Audiobox Aesthetics checkpoint"):
        build(model=str(bad), wavlm=fx.TINY_WAVLM)
    with pytest.raises(ValueError, match="sample 0 is empty"):
        r.predict([torch.zeros(0)], 16000)
