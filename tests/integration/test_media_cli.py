"""`mmalign sample` with video and audio generators, and `mmalign score` over video and audio files.

The generators here are stubs satisfying the `Generator` protocol's sampling side: each
returns a known video / waveform from its seeds, so the written files can be checked against
the exact tensors. `mmalign score` runs the real `video_from_image` over a tiny random CLIP
(and the real CLAP over a tiny model) on files written by `mmalign.media`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch

from mmalign import registry
from mmalign.cli import main
from mmalign.config import num
from mmalign.media import (
    load_audio,
    load_video,
    load_video_with_fps,
    save_audio,
    save_gif,
    save_video,
    tensor_to_pil,
)
from mmalign.rewards import fixtures as fx
from mmalign.rewards.common import build_reward
from mmalign.types import Rollout, Samples

fx.register_test_rewards()


# --------------------------------------------------------------------------- stub generators


def stub_video(seed: int, frames: int, size: int = 32) -> torch.Tensor:
    """F,3,H,W: a smooth ramp whose level depends on the seed, with a bar moving over the frames."""
    base = 0.15 + 0.1 * (seed % 5)
    v = (base + 0.4 * torch.linspace(0, 1, size))[None, None, None, :].expand(frames, 3, size, size).clone()
    for f in range(frames):
        v[f, :, 4:8, (2 * f) % (size - 2) : (2 * f) % (size - 2) + 2] = 0.9
    return v


def stub_audio(seed: int, n: int, sr: int) -> torch.Tensor:
    """1,T: a sine whose pitch depends on the seed."""
    t = torch.arange(n) / sr
    return 0.4 * torch.sin(2 * torch.pi * (220 + 55 * (seed % 7)) * t)[None]


class _Stub:
    """The parts of the Generator protocol `mmalign sample` uses."""

    def __init__(self, cfg):
        self.cfg = cfg

    @property
    def device(self):
        return torch.device("cpu")

    def to(self, device):
        return self

    def load_trained(self, path):
        raise AssertionError("not used")

    def _rollout(self, prompts, samples):
        b = len(prompts)
        return Rollout(samples, torch.zeros(b, 2, 1), torch.zeros(1), None, list(prompts))


@dataclass
class StubVideoConfig:
    pretrained: str = "stub"
    finetune: str = "none"
    num_frames: int = num(5, ge=1)
    fps: int = num(8, ge=1)


class StubVideo(_Stub):
    modality = "video"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.num_frames, self.fps = cfg.num_frames, cfg.fps

    def rollout(self, prompts, num_steps=1, guidance_scale=5.0, eta=0.0, seeds=None, need_log_probs=False, **kw):
        return self._rollout(prompts, Samples(video=torch.stack([stub_video(s, self.num_frames) for s in seeds])))


@dataclass
class StubAudioConfig:
    pretrained: str = "stub"
    finetune: str = "none"
    audio_length_in_s: float = num(0.5, gt=0)


class StubAudio(_Stub):
    modality = "audio"
    sample_rate = 16000

    def rollout(self, prompts, num_steps=1, guidance_scale=5.0, eta=0.0, seeds=None, need_log_probs=False, **kw):
        n = int(round(self.cfg.audio_length_in_s * self.sample_rate))
        audio = torch.stack([stub_audio(s, n, self.sample_rate) for s in seeds])
        return self._rollout(prompts, Samples(audio=audio, sample_rate=self.sample_rate))


def _register():
    if "test_video_stub" not in registry.GENERATORS:

        def build_video(cfg: StubVideoConfig) -> StubVideo:
            """Test generator: known videos from seeds."""
            return StubVideo(cfg)

        def build_audio(cfg: StubAudioConfig) -> StubAudio:
            """Test generator: known sines from seeds."""
            return StubAudio(cfg)

        registry.register_generator("test_video_stub", StubVideoConfig)(build_video)
        registry.register_generator("test_audio_stub", StubAudioConfig)(build_audio)


_register()


def sample(*argv) -> int:
    return main(["sample", "--model", "stub", "--steps", "1", *[str(a) for a in argv]])


def rows(out):
    return [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------- mmalign sample


def test_sample_video_writes_mp4_gif_and_a_grid_per_prompt(tmp_path, capsys):
    out = tmp_path / "v"
    args = ["--generator", "test_video_stub", "--prompt", "a ball", "--prompt", "a dot", "--n", "2"]
    assert sample(*args, "--num-frames", "7", "--fps", "10", "--out", out) == 0
    assert "4 videos (MP4 + GIF, 10 fps), 2 frame grids" in capsys.readouterr().out
    got = rows(out)
    assert [r["path"] for r in got] == [str(out / f"{p:04d}_{k:02d}.mp4") for p in range(2) for k in range(2)]
    for r in got:
        want = stub_video(r["seed"], 7)
        video, fps = load_video_with_fps(r["path"])
        assert video.shape == want.shape and fps == pytest.approx(10.0)
        assert (video - want).abs().mean() < 0.02
        gif, gif_fps = load_video_with_fps(r["gif"])
        assert gif.shape == want.shape and gif_fps == pytest.approx(10.0)
        assert (r["num_frames"], r["fps"]) == (7, 10.0)
    for p in range(2):
        grid = (out / f"{p:04d}_grid.png").stat().st_size
        assert grid > 0
    from PIL import Image

    with Image.open(out / "0000_grid.png") as im:  # 2 rows (samples) x 7 frames of 32x32, 2-px padding
        assert im.size == (7 * 32 + 8 * 2, 2 * 32 + 3 * 2)
    assert not (out / "grid.png").exists()


def test_sample_video_defaults_to_the_generators_frames_and_rate_and_scores_with_a_video_reward(tmp_path):
    out = tmp_path / "v"
    assert (
        sample(
            "--generator",
            "test_video_stub",
            "--prompt",
            "a ball",
            "--reward",
            "video_from_image",
            "--reward-args",
            "image_reward={name: test_mean_pixel}",
            "--reward-args",
            "frames=all",
            "--out",
            out,
        )
        == 0
    )
    (row,) = rows(out)
    video, fps = load_video_with_fps(row["path"])
    assert video.shape[0] == 5 and fps == pytest.approx(8.0)
    assert row["rewards"]["video_from_image"] == pytest.approx(stub_video(row["seed"], 5).mean().item(), abs=1e-6)


def test_sample_audio_writes_wav_or_flac_at_the_models_rate_and_duration(tmp_path, capsys):
    for fmt in ("wav", "flac"):
        out = tmp_path / fmt
        extra = ["--audio-format", fmt] if fmt == "flac" else []
        args = ["--generator", "test_audio_stub", "--prompt", "a beep", "--n", "2", "--duration", "0.25"]
        assert sample(*args, *extra, "--out", out) == 0
        assert f"2 {fmt.upper()} files" in capsys.readouterr().out
        for k, r in enumerate(rows(out)):
            assert r["path"] == str(out / f"0000_{k:02d}.{fmt}")
            assert (r["sample_rate"], r["duration_s"]) == (16000, 0.25)
            wave, sr = load_audio(r["path"])
            assert sr == 16000 and wave.shape == (1, 4000)
            assert (wave - stub_audio(r["seed"], 4000, 16000)).abs().max() <= 1 / 32768 + 1e-7


@pytest.mark.parametrize(
    ("generator", "flag", "message"),
    [
        ("test_video_stub", ["--duration", "2"], "--duration: generator 'test_video_stub' has no length setting"),
        ("test_audio_stub", ["--num-frames", "9"], "--num-frames: generator 'test_audio_stub' has no num_frames"),
        ("test_video_stub", ["--num-frames", "0"], "--num-frames"),
        (
            "test_audio_stub",
            ["--guidance", "best-of-n", "--reward", "test_mean_pixel"],
            "--guidance best-of-n: the guided samplers",
        ),
    ],
)
def test_sample_refuses_a_media_flag_the_generator_has_no_setting_for(tmp_path, capsys, generator, flag, message):
    out = tmp_path / "o"
    assert sample("--generator", generator, "--prompt", "x", *flag, "--out", out) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (out / "samples.jsonl").exists()


# --------------------------------------------------------------------------- mmalign score


def score(*argv) -> int:
    return main(["score", *[str(a) for a in argv]])


def test_score_video_files_with_video_from_image_over_a_tiny_clip(tmp_path, tiny_clip, capsys):
    v0, v1 = stub_video(0, 6), stub_video(3, 6)
    mp4 = save_video(tmp_path / "a.mp4", v0, 8)
    gif = save_gif(tmp_path / "b.gif", v1, 10)
    frames = tmp_path / "frames"
    frames.mkdir()
    for i, f in enumerate(v1):
        tensor_to_pil(f).save(frames / f"{i:03d}.png")
    reward_args = ["image_reward={name: clip, model: local-dir:" + str(tiny_clip) + "}", "frames=all"]
    out = tmp_path / "scores.jsonl"
    argv = ["--reward", "video_from_image", "--reward-args", *reward_args, "--prompt", "a ball", "--out", out]
    assert score(*argv, mp4, gif, frames) == 0
    got = [json.loads(line)["score"] for line in out.read_text().splitlines()]
    image_reward = {"name": "clip", "model": "local-dir:" + str(tiny_clip)}
    reward = build_reward({"name": "video_from_image", "image_reward": image_reward, "frames": "all"}, "r")
    for path, s in zip((mp4, gif, frames), got):
        with torch.no_grad():
            want = reward(Samples(video=load_video(path)[None]), ["a ball"])
        assert s == pytest.approx(want.item(), rel=1e-5, abs=1e-6)
    assert got[0] != pytest.approx(got[1], abs=1e-6)  # different videos, different scores
    capsys.readouterr()

    wav = save_audio(tmp_path / "x.wav", stub_audio(0, 800, 16000), 16000)
    assert score(*argv[:-2], wav) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"error: {wav}: is audio, but the reward scores video; give video files"


def test_score_audio_files_refuses_what_the_reward_cannot_use(tmp_path, capsys):
    clap = fx.tiny("clap")["model"]  # a CLAP feature extractor at 16 kHz
    ok = save_audio(tmp_path / "ok.flac", stub_audio(1, 8000, 22050), 22050)  # resampled to 16 kHz
    odd = save_audio(tmp_path / "odd.wav", stub_audio(1, 8000, 44101), 44101)
    six = save_audio(tmp_path / "six.wav", stub_audio(1, 8000, 16000).expand(6, -1), 16000)
    out = tmp_path / "s.jsonl"
    base = ["--reward", "clap", "--reward-args", f"model={clap}", "--prompt", "a beep"]
    assert score(*base, "--out", out, ok) == 0
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    wave, sr = load_audio(ok)
    with torch.no_grad():
        want = build_reward({"name": "clap", "model": clap}, "r")(Samples(audio=wave[None], sample_rate=sr), ["a beep"])
    assert row["score"] == pytest.approx(want.item(), rel=1e-5)
    capsys.readouterr()

    assert score(*base, odd) == 2
    assert "odd.wav: 44101 Hz cannot be resampled to 16000 Hz" in capsys.readouterr().err
    assert score(*base, six) == 2
    assert "six.wav: 6 channels; up to 2 (mono or stereo) are supported" in capsys.readouterr().err
    assert score(*base, "--downmix", "--out", out, six) == 0
    mono, _ = load_audio(six, downmix=True)
    with torch.no_grad():
        want = build_reward({"name": "clap", "model": clap}, "r")(
            Samples(audio=mono[None], sample_rate=16000), ["a beep"]
        )
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["score"] == pytest.approx(want.item(), rel=1e-5)


# --------------------------------------------------------------------------- the real tiny generators


@pytest.fixture(scope="module")
def tiny_wan(tmp_path_factory):
    from mmalign.testing import make_tiny_wan

    return make_tiny_wan(tmp_path_factory.mktemp("models") / "wan")


@pytest.fixture(scope="module")
def tiny_audioldm(tmp_path_factory):
    from mmalign.testing import make_tiny_audioldm

    return make_tiny_audioldm(tmp_path_factory.mktemp("models") / "audioldm")


def test_sample_wan_from_a_run_config_with_num_frames_overridden(tmp_path, tiny_wan, capsys):
    cfg = tmp_path / "wan.yaml"
    cfg.write_text(
        f"generator: {{name: wan, pretrained: {tiny_wan}, finetune: none, resolution: 32, num_frames: 5, "
        "max_sequence_length: 8, fps: 12}\n"
        "method: {name: diffusion_dpo}\n"
        "data: {kind: prompts, prompts: 'toy:train'}\n"
    )
    out = tmp_path / "v"
    assert sample("--config", cfg, "--prompt", "a red ball", "--num-frames", "9", "--out", out) == 0
    (row,) = rows(out)
    video, fps = load_video_with_fps(row["path"])
    assert video.shape == (9, 3, 32, 32) and fps == pytest.approx(12.0)  # the config's rate
    assert (row["num_frames"], row["fps"]) == (9, 12)
    assert load_video(row["gif"]).shape == (9, 3, 32, 32) and (out / "0000_grid.png").is_file()
    capsys.readouterr()
    assert sample("--config", cfg, "--prompt", "a red ball", "--num-frames", "8", "--out", tmp_path / "w") == 2
    assert "wan.yaml: generator.num_frames: 8 is not 4k+1" in capsys.readouterr().err


def test_sample_audioldm_writes_the_generators_waveforms_at_its_rate(tmp_path, tiny_audioldm):
    from mmalign import registry
    from mmalign.config import parse_dataclass

    out = tmp_path / "a"
    args = ["--generator", "audioldm", "--model", tiny_audioldm, "--prompt", "a dog", "--n", "2", "--steps", "2"]
    assert main(["sample", *[str(a) for a in args], "--duration", "0.5", "--out", str(out)]) == 0
    got = rows(out)
    entry = registry.lookup("generator", "audioldm")
    gen = entry.build(
        parse_dataclass(
            entry.config, {"pretrained": str(tiny_audioldm), "finetune": "none", "audio_length_in_s": 0.5}, "g"
        )
    )
    ro = gen.rollout(["a dog", "a dog"], num_steps=2, guidance_scale=5.0, eta=0.0, seeds=[0, 1], need_log_probs=False)
    for r, want in zip(got, ro.samples.audio):
        wave, sr = load_audio(r["path"])
        assert sr == ro.samples.sample_rate == r["sample_rate"]
        assert wave.shape == want.shape and r["duration_s"] == pytest.approx(want.shape[-1] / sr)
        assert (wave - want).abs().max() <= 1 / 32768 + 1e-6  # 16-bit PCM


def test_sample_stable_audio_duration_sets_the_end_time_and_is_refused_past_the_models_length(tmp_path, capsys):
    from mmalign.testing import make_tiny_stable_audio

    model = make_tiny_stable_audio(tmp_path / "sa")
    args = ["--generator", "stable_audio", "--model", model, "--prompt", "a dog", "--steps", "2"]
    out = tmp_path / "a"
    assert sample(*args, "--duration", "2", "--audio-format", "flac", "--out", out) == 0
    (row,) = rows(out)
    wave, sr = load_audio(row["path"])
    assert row["path"].endswith("0000_00.flac") and sr == row["sample_rate"]
    assert wave.shape[-1] == int(2 * sr) and row["duration_s"] == pytest.approx(2.0)
    capsys.readouterr()
    assert sample(*args, "--duration", "100", "--out", tmp_path / "b") == 2
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if x.startswith("error:")]  # (stderr also holds the loading bars)
    assert "generator.audio_end_in_s: 100 s of audio is longer than the model's maximum" in line
    assert "Traceback" not in err
