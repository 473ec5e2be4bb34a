"""Images are decoded as viewers show them; videos (PyAV, Pillow for GIF) and audio (soundfile)
survive a write -> read round trip; bad media is refused with a MediaError naming the file."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from mmalign.media import (
    MediaError,
    load_audio,
    load_video,
    load_video_with_fps,
    media_kind,
    open_image,
    resample_problem,
    save_audio,
    save_gif,
    save_video,
    save_wav,
    tensor_to_pil,
    video_grid,
)


def png_bytes(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=kw.pop("format", "PNG"), **kw)
    return buf.getvalue()


def test_16_bit_greyscale_is_scaled_not_clipped_to_white():
    ramp = np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)
    out = np.asarray(open_image(png_bytes(Image.fromarray(ramp)), "ramp16.png"))
    assert out.shape == (32, 32, 3)
    np.testing.assert_array_equal(out[..., 0], np.rint(ramp / 257.0).astype(np.uint8))
    assert 120 < out.mean() < 135


def test_exif_orientation_is_applied():
    im = Image.new("RGB", (40, 20), (255, 0, 0))
    im.paste((0, 0, 255), (0, 0, 20, 20))  # left half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    out = open_image(png_bytes(im, format="JPEG", exif=exif, quality=95), "rotated.jpg")
    assert out.size == (20, 40)
    top = np.asarray(out)[:10].mean(axis=(0, 1))
    assert top[2] > 200 and top[0] < 60  # the blue half is on top after the rotation


def test_transparency_is_composited_over_white():
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    rgba.paste((255, 0, 0, 255), (0, 0, 4, 8))
    out = np.asarray(open_image(png_bytes(rgba), "alpha.png"))
    assert (out[:, :4] == [255, 0, 0]).all() and (out[:, 4:] == 255).all()


def test_palette_and_cmyk_use_pillows_conversion():
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (8, 8, 3), dtype=np.uint8))
    pal = rgb.quantize(16)
    np.testing.assert_array_equal(np.asarray(open_image(png_bytes(pal), "p.png")), np.asarray(pal.convert("RGB")))
    cmyk = rgb.convert("CMYK")
    got = np.asarray(open_image(png_bytes(cmyk, format="TIFF"), "c.tif"))
    np.testing.assert_array_equal(got, np.asarray(cmyk.convert("RGB")))


def test_decompression_bomb_is_a_media_error(monkeypatch):
    data = png_bytes(Image.new("RGB", (64, 64)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64 // 4)  # more than twice the limit: a bomb
    with pytest.raises(MediaError, match="bomb.png: refused as a decompression bomb"):
        open_image(data, "bomb.png")


def test_float_image_is_refused_by_name():
    with pytest.raises(MediaError, match="f.tif: floating-point image"):
        open_image(png_bytes(Image.new("F", (4, 4)), format="TIFF"), "f.tif")


# --------------------------------------------------------------------------- video


def moving_bar(frames: int = 9, h: int = 32, w: int = 32) -> torch.Tensor:
    """A smooth test clip: a grey ramp with a bright bar moving right (codec-friendly content)."""
    v = torch.linspace(0.1, 0.6, w)[None, None, None, :].expand(frames, 3, h, w).clone()
    for f in range(frames):
        v[f, :, :, (3 * f) % w : (3 * f) % w + 3] = 0.95
    v[:, 0] *= 0.8
    return v


@pytest.mark.parametrize(("suffix", "fps"), [(".mp4", 8), (".mp4", 23.976), (".webm", 12), (".mov", 7.5)])
def test_video_round_trip_keeps_frames_rate_and_pixels(tmp_path, suffix, fps):
    v = moving_bar(9)
    path = save_video(tmp_path / f"clip{suffix}", v, fps)
    got, got_fps = load_video_with_fps(path)
    assert got.shape == v.shape
    assert got_fps == pytest.approx(fps, rel=1e-9)
    assert (got - v).abs().mean() < 0.02  # lossy codec, but close on smooth content
    assert torch.equal(load_video(path), got)


def test_odd_sized_video_is_padded_to_even_with_its_edge(tmp_path):
    v = moving_bar(4, 17, 33)
    got = load_video(save_video(tmp_path / "odd.mp4", v, 8))
    assert got.shape == (4, 3, 18, 34)
    assert (got[:, :, :17, :33] - v).abs().mean() < 0.03
    assert (got[:, :, 17] - got[:, :, 16]).abs().mean() < 0.03  # the padding repeats the last row


def test_num_frames_keeps_evenly_spaced_frames_and_the_duration(tmp_path):
    v = moving_bar(9)
    path = save_video(tmp_path / "a.mp4", v, 9)
    got, fps = load_video_with_fps(path, num_frames=3)
    full = load_video(path)
    assert torch.equal(got, full[[0, 4, 8]])
    assert fps == pytest.approx(3.0)  # 9 frames at 9 fps = 3 frames at 3 fps: one second either way


def test_gif_round_trip_and_its_rate_in_hundredths(tmp_path):
    v = moving_bar(6)
    got, fps = load_video_with_fps(save_gif(tmp_path / "a.gif", v, 10))
    assert got.shape == v.shape and fps == pytest.approx(10.0)
    assert (got - v).abs().mean() < 0.02  # 256-colour palette
    _, fps8 = load_video_with_fps(save_video(tmp_path / "b.gif", v, 8))  # .gif through save_video too
    assert fps8 == pytest.approx(100 / 12)  # 0.125 s is stored as 12 hundredths


def test_frame_folder_reads_in_name_order_without_a_rate(tmp_path):
    v = moving_bar(3)
    for i, frame in enumerate(v):
        tensor_to_pil(frame).save(tmp_path / f"f{i:02d}.png")
    got, fps = load_video_with_fps(tmp_path)
    assert fps is None and got.shape == v.shape
    assert (got - v).abs().max() <= 0.5 / 255 + 1e-6


def test_video_grid_is_one_row_of_frames_per_video():
    grid = video_grid(torch.rand(2, 12, 3, 8, 10), max_frames=4)
    assert grid.size == (4 * 10 + 5 * 2, 2 * 8 + 3 * 2)


def test_bad_videos_are_one_line_media_errors_naming_the_file(tmp_path):
    good = save_video(tmp_path / "good.mp4", moving_bar(8), 8)
    (tmp_path / "cut.mp4").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (tmp_path / "noise.mp4").write_bytes(np.random.default_rng(0).bytes(4096))
    (tmp_path / "empty.mp4").write_bytes(b"")
    # a GIF with a header and a trailer but no image
    (tmp_path / "none.gif").write_bytes(b"GIF89a" + b"\x01\x00\x01\x00\x00\x00\x00" + b"\x3b")
    for name in ("cut.mp4", "noise.mp4", "empty.mp4", "none.gif"):
        with pytest.raises(MediaError) as e:
            load_video(tmp_path / name)
        msg = str(e.value)
        assert name in msg and "\n" not in msg, msg
    frames = tmp_path / "frames"
    frames.mkdir()
    tensor_to_pil(torch.rand(3, 8, 8)).save(frames / "a.png")
    tensor_to_pil(torch.rand(3, 8, 12)).save(frames / "b.png")
    with pytest.raises(MediaError, match=r"frames: frames differ in size \(a.png is 8x8, b.png is 12x8\)"):
        load_video(frames)
    with pytest.raises(MediaError, match="gone.mp4: video file or frame directory not found"):
        load_video(tmp_path / "gone.mp4")


def test_save_video_refuses_bad_tensors_and_suffixes(tmp_path):
    with pytest.raises(ValueError, match="F,3,H,W"):
        save_video(tmp_path / "a.mp4", torch.rand(3, 8, 8), 8)
    with pytest.raises(ValueError, match="NaN"):
        save_video(tmp_path / "a.mp4", torch.full((2, 3, 8, 8), float("nan")), 8)
    with pytest.raises(ValueError, match="fps must be a positive number"):
        save_video(tmp_path / "a.mp4", torch.rand(2, 3, 8, 8), 0)
    with pytest.raises(ValueError, match="cannot write video as .avi"):
        save_video(tmp_path / "a.avi", torch.rand(2, 3, 8, 8), 8)


def test_media_kind_reads_a_gif_as_video_only_for_a_video_reward(tmp_path):
    assert media_kind(tmp_path / "a.gif") == "image"
    assert media_kind(tmp_path / "a.gif", prefer="video") == "video"
    assert media_kind(tmp_path / "a.webm") == "video" and media_kind(tmp_path / "a.flac") == "audio"
    assert media_kind(tmp_path) == "video"


# --------------------------------------------------------------------------- audio


def tone(channels: int = 1, n: int = 1600, sr: int = 16000) -> torch.Tensor:
    t = torch.arange(n) / sr
    return torch.stack([0.5 * torch.sin(2 * torch.pi * 440 * (c + 1) * t) for c in range(channels)])


@pytest.mark.parametrize(
    ("name", "subtype", "tol"),
    [("a.wav", None, 1 / 32768), ("f.wav", "FLOAT", 0.0), ("b.flac", None, 1 / 32768), ("c.flac", "PCM_24", 2**-23)],
)
def test_audio_round_trip_keeps_rate_channels_and_samples(tmp_path, name, subtype, tol):
    a = tone(2)
    wave, sr = load_audio(save_audio(tmp_path / name, a, 16000, subtype))
    assert sr == 16000 and wave.shape == a.shape and wave.dtype == torch.float32
    assert (wave - a).abs().max() <= tol + 1e-7


def test_wav_is_16_bit_pcm_by_default_and_clips(tmp_path):
    import soundfile

    path = save_wav(tmp_path / "a.wav", torch.tensor([[1.5, -2.0, 0.25]]), 8000)
    info = soundfile.info(str(path))
    assert (info.subtype, info.samplerate, info.channels, info.frames) == ("PCM_16", 8000, 1, 3)
    wave, _ = load_audio(path)
    assert wave[0].tolist() == pytest.approx([32767 / 32768, -1.0, 0.25])


def test_bad_audio_is_a_one_line_media_error_naming_the_file(tmp_path):
    import soundfile

    good = save_audio(tmp_path / "good.wav", tone(1), 16000)
    (tmp_path / "cut.wav").write_bytes(good.read_bytes()[:1000])
    (tmp_path / "noise.wav").write_bytes(np.random.default_rng(0).bytes(2000))
    (tmp_path / "noise.flac").write_bytes(np.random.default_rng(1).bytes(2000))
    soundfile.write(str(tmp_path / "empty.wav"), np.zeros((0, 1), np.float32), 16000)
    soundfile.write(str(tmp_path / "nan.wav"), np.array([[0.0], [0.1], [np.nan]], np.float32), 16000, "FLOAT")
    save_audio(tmp_path / "six.wav", tone(6), 16000)
    cases = {
        "cut.wav": "truncated WAV file",
        "noise.wav": "not a readable audio file",
        "noise.flac": "not a readable audio file",
        "empty.wav": "zero-length audio",
        "nan.wav": "holds NaN or infinite samples \\(first at sample 2",
        "six.wav": "6 channels; up to 2 \\(mono or stereo\\) are supported",
        "gone.wav": "audio file not found",
    }
    for name, why in cases.items():
        with pytest.raises(MediaError, match=f"{name}: {why}") as e:
            load_audio(tmp_path / name)
        assert "\n" not in str(e.value)


def test_downmix_mixes_any_channel_count_to_mono_by_the_mean(tmp_path):
    a = tone(6)
    wave, sr = load_audio(save_audio(tmp_path / "six.wav", a, 16000, "FLOAT"), downmix=True)
    assert wave.shape == (1, a.shape[1])
    torch.testing.assert_close(wave[0], a.mean(0), atol=1e-7, rtol=0)


def test_save_audio_refuses_what_it_cannot_write(tmp_path):
    with pytest.raises(ValueError, match="x.wav: audio holds NaN"):
        save_audio(tmp_path / "x.wav", torch.tensor([0.0, float("inf")]), 16000)
    with pytest.raises(ValueError, match="x.wav: audio must be C,T"):
        save_audio(tmp_path / "x.wav", torch.zeros(1, 0), 16000)
    with pytest.raises(ValueError, match="sample_rate must be a positive integer"):
        save_audio(tmp_path / "x.wav", torch.zeros(1, 4), 0)
    with pytest.raises(ValueError, match="cannot write audio as .mp4"):
        save_audio(tmp_path / "x.mp4", torch.zeros(1, 4), 16000)


def test_resample_problem_refuses_only_rates_torchaudio_cannot_reduce():
    assert resample_problem(44100, 48000) is None and resample_problem(22050, 16000) is None
    assert "44101 Hz cannot be resampled to 48000 Hz" in resample_problem(44101, 48000)
    assert resample_problem(0, 16000) == "invalid sample rate 0"
