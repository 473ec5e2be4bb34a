"""Reading media files into the tensors `Samples` holds, with errors that name the file."""

from __future__ import annotations

import math
import re
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor


class MediaError(ValueError):
    """A media file is missing, unreadable or corrupt."""


def open_image(source, name: str | None = None) -> Image.Image:
    """Open and fully decode an image (path, bytes or file object) as 8-bit RGB PIL.

    - EXIF orientation is applied (`ImageOps.exif_transpose`), as viewers show the photo.
    - 16-bit greyscale (modes I;16*, and I holding 16-bit PNG values) is scaled to 8 bits (v / 257),
      instead of Pillow's `convert("RGB")`, which clips it to white.
    - Transparency (RGBA, LA, P or L with a transparent colour) is composited over white.
    - Palette and CMYK images go through Pillow's own conversion to RGB.
    - A decompression bomb (more than `PIL.Image.MAX_IMAGE_PIXELS` x 2 pixels) and a floating-point
      image are refused with a `MediaError`, like any unreadable image (so `skip_bad` skips them).
    """
    import io

    name = name or str(source)
    if isinstance(source, (str, Path)):
        if not Path(source).is_file():
            raise MediaError(f"{name}: image file not found")
        fp = source
    elif isinstance(source, (bytes, bytearray)):
        fp = io.BytesIO(source)
    else:
        fp = source
    try:
        with Image.open(fp) as im:
            im.load()  # decode now: a truncated file fails here, not mid-training
            return _to_rgb(ImageOps.exif_transpose(im), name)
    except Image.DecompressionBombError as e:
        raise MediaError(f"{name}: refused as a decompression bomb ({e})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise MediaError(f"{name}: not a readable image ({e})") from None


def _to_rgb(im: Image.Image, name: str) -> Image.Image:
    if im.mode.startswith("I;16") or im.mode == "I":
        arr = np.asarray(im, dtype=np.float64)
        im = Image.fromarray(np.clip(np.rint(arr / 257.0), 0, 255).astype(np.uint8), "L")
    elif im.mode == "F":
        raise MediaError(f"{name}: floating-point image (mode F); save it as 8- or 16-bit first")
    if im.mode == "P" or (im.mode in ("L", "RGB") and "transparency" in im.info):
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def pil_to_tensor(im: Image.Image) -> Tensor:
    """PIL RGB -> 3,H,W float32 in [0,1]."""
    return torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0


def tensor_to_pil(x: Tensor) -> Image.Image:
    """3,H,W float in [0,1] -> PIL RGB."""
    arr = (x.detach().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr)


def load_image(source, name: str | None = None) -> Tensor:
    return pil_to_tensor(open_image(source, name))


def image_grid(images: Tensor, nrow: int) -> Image.Image:
    """B,3,H,W in [0,1] -> one PIL grid image."""
    import torchvision

    return tensor_to_pil(
        torchvision.utils.make_grid(images.detach().float().cpu(), nrow=nrow, padding=2, pad_value=1.0)
    )


# --------------------------------------------------------------------------- video
# Encoding and decoding go through PyAV (FFmpeg); GIFs through Pillow. Frames are F,3,H,W
# float in [0,1]; a batch of videos (Samples.video) is B,F,3,H,W.

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
VIDEO_SUFFIXES = {".mp4", ".webm", ".mov", ".avi", ".mkv", ".gif"}
AUDIO_SUFFIXES = {".wav", ".flac", ".ogg", ".mp3"}

# suffix -> (FFmpeg encoder, its fallback): H.264 where the FFmpeg build has libx264, else MPEG-4 part 2
_VIDEO_CODECS = {
    ".mp4": ("libx264", "mpeg4"),
    ".mov": ("libx264", "mpeg4"),
    ".mkv": ("libx264", "mpeg4"),
    ".webm": ("libvpx-vp9", "libvpx"),
}


def media_kind(path: str | Path, prefer: str | None = None) -> str:
    """'image', 'video' (a directory of frames or a video file) or 'audio', from the path.

    A .gif is an image unless `prefer` is "video" (an animated GIF scored by a video reward).
    """
    p = Path(path)
    if p.is_dir():
        return "video"
    suf = p.suffix.lower()
    if suf in AUDIO_SUFFIXES:
        return "audio"
    if suf == ".gif" and prefer == "video":
        return "video"
    if suf in VIDEO_SUFFIXES and suf != ".gif":
        return "video"
    if suf in IMAGE_SUFFIXES:
        return "image"
    raise MediaError(
        f"{p}: unknown media type (suffix {suf or 'none'}); images, videos (frame folders, .mp4, .webm, .gif) "
        "or audio (.wav, .flac, .ogg, .mp3)"
    )


def _check_video(video: Tensor, who: str) -> Tensor:
    if not isinstance(video, Tensor) or video.ndim != 4 or video.shape[1] != 3 or video.shape[0] == 0:
        shape = tuple(video.shape) if isinstance(video, Tensor) else type(video).__name__
        raise ValueError(f"{who}: video must be F,3,H,W float in [0,1] with F >= 1, got {shape}")
    v = video.detach().float().cpu()
    if not torch.isfinite(v).all():
        raise ValueError(f"{who}: video holds NaN or infinite values")
    return v


def _fps(fps: float, who: str) -> float:
    if not isinstance(fps, (int, float)) or not math.isfinite(fps) or fps <= 0:
        raise ValueError(f"{who}: fps must be a positive number, got {fps!r}")
    return float(fps)


def _to_uint8_frames(video: Tensor) -> np.ndarray:
    """F,3,H,W float in [0,1] -> F,H,W,3 uint8."""
    return (video.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def save_video(path: str | Path, video: Tensor, fps: float, crf: int = 18) -> Path:
    """F,3,H,W float in [0,1] -> a video file, the codec chosen by the suffix.

    - .mp4 / .mov / .mkv: H.264 (libx264, `crf` quality: 0 lossless .. 51; 18 looks lossless),
      or MPEG-4 part 2 where the FFmpeg build lacks libx264; pixel format yuv420p, which players
      and browsers expect. yuv420p stores colour at half resolution, so a frame of odd width or
      height is padded by one copy of its last column / row to even size (a 33x17 video is read
      back as 34x18); even sizes (e.g. 32x32) are kept exactly.
    - .webm: VP9 (libvpx-vp9), yuv420p with the same padding.
    - .gif: `save_gif`.
    `fps` may be fractional (23.976 is stored as 2997/125); the frame count and the rate survive
    a `load_video_with_fps` round trip exactly (the pixels are lossy, within a few levels of 255).
    """
    import av

    p = Path(path)
    suf = p.suffix.lower()
    if suf == ".gif":
        return save_gif(p, video, fps)
    if suf not in _VIDEO_CODECS:
        raise ValueError(f"{p}: cannot write video as {suf or 'no suffix'}; use .mp4, .webm, .mov, .mkv or .gif")
    v = _check_video(video, str(p))
    rate = Fraction(_fps(fps, str(p))).limit_denominator(100_000)
    frames = _to_uint8_frames(v)
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    if pad_h or pad_w:
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    first, fallback = _VIDEO_CODECS[suf]
    codec = first if first in av.codecs_available else fallback
    with av.open(str(p), "w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": str(int(crf))}
        elif codec.startswith("libvpx"):
            stream.options = {"crf": str(int(crf)), "b:v": "0"}
        else:
            stream.bit_rate = 8_000_000
        for arr in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return p


def save_gif(path: str | Path, video: Tensor, fps: float, loop: int = 0) -> Path:
    """F,3,H,W float in [0,1] -> an animated GIF (Pillow; 256 colours per frame, `loop` 0 = forever).

    GIF frame delays are whole hundredths of a second, so the rate is exact only where 100/fps
    is an integer (10, 20, 25, 50 fps); 8 fps is stored as 0.12 s per frame. Pillow merges
    consecutive identical frames into one longer frame, so a still video reads back with fewer frames.
    """
    p = Path(path)
    v = _check_video(video, str(p))
    duration = max(1000.0 / _fps(fps, str(p)), 10.0)  # ms; GIF's smallest delay is 10 ms
    images = [Image.fromarray(a) for a in _to_uint8_frames(v)]
    images[0].save(p, save_all=True, append_images=images[1:], duration=duration, loop=loop, format="GIF")
    return p


def video_grid(video: Tensor, max_frames: int = 8) -> Image.Image:
    """A still for a quick look: F,3,H,W -> one row of up to `max_frames` evenly spaced frames;
    B,F,3,H,W -> one such row per video."""
    import torchvision

    v = video.detach().float().cpu()
    if v.ndim == 4:
        v = v[None]
    if v.ndim != 5 or v.shape[2] != 3:
        raise ValueError(f"video_grid: expected F,3,H,W or B,F,3,H,W, got {tuple(video.shape)}")
    keep = min(max_frames, v.shape[1])
    idx = torch.linspace(0, v.shape[1] - 1, keep).round().long()
    v = v[:, idx]
    return tensor_to_pil(torchvision.utils.make_grid(v.flatten(0, 1), nrow=keep, padding=2, pad_value=1.0))


def load_video(source: str | Path, num_frames: int | None = None) -> Tensor:
    """A video -> F,3,H,W float in [0,1] (`load_video_with_fps` without the rate)."""
    return load_video_with_fps(source, num_frames)[0]


def load_video_with_fps(source: str | Path, num_frames: int | None = None) -> tuple[Tensor, float | None]:
    """A video -> (F,3,H,W float in [0,1], frames per second).

    - A video file (.mp4, .webm, .mov, .mkv, .avi, ...) is decoded with PyAV: every frame of its
      first video stream, at the stream's average rate.
    - A .gif is decoded with Pillow (frames composited as viewers show them); its rate is the
      frame count over the summed frame delays.
    - A directory is read as its image files in sorted name order (all of one size); it has no
      rate (None).
    `num_frames` keeps that many evenly spaced frames (first and last included); the rate is then
    scaled by kept / total so that the clip's duration stays the same.
    A missing, corrupt, empty or truncated file is a `MediaError` naming it.
    """
    p = Path(source)
    fps: float | None
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise MediaError(f"{p}: frame directory holds no image files")
        frames = [load_image(f) for f in files]
        sizes = {tuple(f.shape[1:]): f_.name for f, f_ in zip(frames, files)}
        if len(sizes) > 1:
            desc = ", ".join(f"{n} is {w}x{h}" for (h, w), n in sorted(sizes.items(), key=lambda kv: kv[1]))
            raise MediaError(f"{p}: frames differ in size ({desc}); a video's frames must share one size")
        video, fps = torch.stack(frames), None
    elif p.is_file():
        video, fps = _decode_gif(p) if p.suffix.lower() == ".gif" else _decode_video_file(p)
    else:
        raise MediaError(f"{p}: video file or frame directory not found")
    if num_frames is not None and num_frames < len(video):
        idx = torch.linspace(0, len(video) - 1, num_frames).round().long()
        if fps is not None:
            fps = fps * num_frames / len(video)
        video = video[idx]
    return video, fps


def _decode_video_file(p: Path) -> tuple[Tensor, float]:
    import av

    try:
        with av.open(str(p)) as container:
            if not container.streams.video:
                raise MediaError(f"{p}: holds no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    except MediaError:
        raise
    except (av.error.FFmpegError, OSError, ValueError, EOFError, IndexError) as e:
        raise MediaError(f"{p}: not a readable video ({_one_line(e)})") from None
    if not frames:
        raise MediaError(f"{p}: no frames decoded (corrupt or empty video)")
    if len({f.shape for f in frames}) > 1:
        raise MediaError(f"{p}: the frame size changes mid-stream ({frames[0].shape[1]}x{frames[0].shape[0]} first)")
    if not rate or float(rate) <= 0:
        raise MediaError(f"{p}: the video stream has no frame rate")
    video = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float() / 255.0
    return video, float(rate)


def _decode_gif(p: Path) -> tuple[Tensor, float | None]:
    from PIL import ImageSequence

    frames, durations = [], []
    try:
        with Image.open(p) as im:
            if im.format != "GIF":
                raise MediaError(f"{p}: not a GIF (Pillow reads it as {im.format})")
            for frame in ImageSequence.Iterator(im):
                frames.append(pil_to_tensor(_to_rgb(frame.copy(), str(p))))
                durations.append(float(frame.info.get("duration", 0) or 0))
    except MediaError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:
        raise MediaError(f"{p}: not a readable GIF ({_one_line(e)})") from None
    if not frames:
        raise MediaError(f"{p}: GIF holds no frames")
    total = sum(durations)
    return torch.stack(frames), (1000.0 * len(frames) / total if total > 0 else None)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


# --------------------------------------------------------------------------- audio
# Through soundfile (libsndfile): WAV (PCM 8/16/24/32-bit, float), FLAC, OGG/Vorbis, MP3.
# Audio is C,T float in [-1,1]; a batch (Samples.audio) is B,C,T with one sample_rate.

MAX_AUDIO_CHANNELS = 2  # mono and stereo; more (5.1, 7.1) only with downmix=True
_AUDIO_SUBTYPES = {".wav": "PCM_16", ".flac": "PCM_16", ".ogg": "VORBIS"}


def save_audio(path: str | Path, audio: Tensor, sample_rate: int, subtype: str | None = None) -> Path:
    """C,T (or T) float in [-1,1] -> an audio file through soundfile, the format by the suffix.

    .wav: 16-bit PCM by default; `subtype` "PCM_24", "PCM_32" or "FLOAT" (32-bit IEEE float,
    keeps values exactly, including beyond [-1,1]). .flac: 16-bit (or "PCM_24"). .ogg: Vorbis.
    PCM subtypes clip to [-1,1] (full scale is 32767/32768 for 16-bit). NaN or infinite samples,
    an empty waveform or a non-positive rate are refused with a ValueError naming the file.
    """
    import soundfile

    p = Path(path)
    suf = p.suffix.lower()
    if suf not in _AUDIO_SUBTYPES:
        raise ValueError(f"{p}: cannot write audio as {suf or 'no suffix'}; use .wav, .flac or .ogg")
    a = audio.detach().float().cpu()
    if a.ndim == 1:
        a = a[None]
    if a.ndim != 2 or a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"{p}: audio must be C,T (or T) with T >= 1, got shape {tuple(audio.shape)}")
    if not torch.isfinite(a).all():
        raise ValueError(f"{p}: audio holds NaN or infinite samples")
    if int(sample_rate) != sample_rate or sample_rate <= 0:
        raise ValueError(f"{p}: sample_rate must be a positive integer, got {sample_rate!r}")
    subtype = (subtype or _AUDIO_SUBTYPES[suf]).upper()
    if subtype.startswith("PCM"):
        a = a.clamp(-1, 1)
    try:
        soundfile.write(str(p), a.T.contiguous().numpy(), int(sample_rate), subtype=subtype)
    except (soundfile.LibsndfileError, ValueError, TypeError) as e:
        raise ValueError(f"{p}: cannot write {suf} with subtype {subtype} ({_one_line(e)})") from None
    return p


def save_wav(path: str | Path, audio: Tensor, sample_rate: int) -> Path:
    """C,T (or T) float in [-1,1] -> 16-bit PCM WAV (`save_audio`)."""
    return save_audio(Path(path), audio, sample_rate, "PCM_16")


def load_audio(
    source: str | Path, max_channels: int | None = MAX_AUDIO_CHANNELS, downmix: bool = False
) -> tuple[Tensor, int]:
    """An audio file -> (C,T float32 in [-1,1], sample_rate), through soundfile.

    Refused with a `MediaError` naming the file: a missing or unreadable file, a WAV whose data is
    shorter than its header says (truncated), zero samples, NaN or infinite samples (float WAV),
    and more than `max_channels` channels (default 2: mono and stereo). `downmix=True` mixes any
    number of channels to mono (1,T) by the plain mean over channels, as the audio rewards mix
    stereo (for 5.1 that includes the LFE channel at full weight).
    """
    import soundfile

    p = Path(source)
    if not p.is_file():
        raise MediaError(f"{p}: audio file not found")
    try:
        with soundfile.SoundFile(str(p)) as f:
            sr, info = int(f.samplerate), f.extra_info
            data = f.read(dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError, OSError, ValueError, TypeError) as e:
        raise MediaError(f"{p}: not a readable audio file ({_one_line(e)})") from None
    m = re.search(r"^data\s*:\s*(\d+)\s*\(should be (\d+)\)", info, re.M)
    if m and int(m.group(2)) < int(m.group(1)):
        raise MediaError(f"{p}: truncated WAV file ({m.group(2)} data bytes, header says {m.group(1)})")
    if sr <= 0:
        raise MediaError(f"{p}: invalid sample rate {sr}")
    if data.shape[0] == 0:
        raise MediaError(f"{p}: zero-length audio (no samples)")
    if not np.isfinite(data).all():
        bad = int(np.argwhere(~np.isfinite(data))[0][0])
        raise MediaError(f"{p}: holds NaN or infinite samples (first at sample {bad}, {bad / sr:.3f} s)")
    wave = torch.from_numpy(data.T.copy())
    if downmix and wave.shape[0] > 1:
        wave = wave.mean(0, keepdim=True)
    elif max_channels is not None and wave.shape[0] > max_channels:
        raise MediaError(
            f"{p}: {wave.shape[0]} channels; up to {max_channels} (mono or stereo) are supported: "
            "mix it down first (e.g. ffmpeg -i IN -ac 2 OUT.wav) or downmix to mono (mmalign score --downmix)"
        )
    return wave, sr


def resample_problem(orig: int, new: int, limit: int = 10_000_000) -> str | None:
    """Why `torchaudio.functional.resample(orig -> new)` cannot run, or None when it can.

    Its polyphase kernel has (new/g) x (orig/g + ~12) taps, g = gcd(orig, new): 44100 -> 48000
    (g = 300) needs 160 x 159, but 44101 -> 48000 (g = 1) ~2e9 taps (8 GB). Rates whose reduced
    product exceeds `limit` are refused.
    """
    if orig <= 0 or new <= 0:
        return f"invalid sample rate {orig if orig <= 0 else new}"
    g = math.gcd(orig, new)
    if (orig // g) * (new // g) > limit:
        return (
            f"{orig} Hz cannot be resampled to {new} Hz (the rates share no large common factor, "
            f"so the resampling filter would need {(orig // g) * (new // g):.1e} taps); "
            "resample it to a common rate (16000, 22050, 44100 or 48000 Hz) first"
        )
    return None
