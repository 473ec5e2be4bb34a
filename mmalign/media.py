"""Reading media files into the tensors `Samples` holds, with errors that name the file."""

from __future__ import annotations

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


# --------------------------------------------------------------------------- video / audio
# (appended for `mmalign score`; the functions above are unchanged)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
VIDEO_SUFFIXES = {".mp4", ".webm", ".mov", ".avi", ".mkv", ".gif"}
AUDIO_SUFFIXES = {".wav", ".flac", ".ogg", ".mp3"}


def media_kind(path: str | Path) -> str:
    """'image', 'video' (a directory of frames or a video file) or 'audio', from the path."""
    p = Path(path)
    if p.is_dir():
        return "video"
    suf = p.suffix.lower()
    if suf in AUDIO_SUFFIXES:
        return "audio"
    if suf in VIDEO_SUFFIXES and suf != ".gif":
        return "video"
    if suf in IMAGE_SUFFIXES:
        return "image"
    raise MediaError(
        f"{p}: unknown media type (suffix {suf or 'none'}); images, videos (frame folders, .mp4) or audio (.wav, .flac)"
    )


def load_video(source: str | Path, num_frames: int | None = None) -> Tensor:
    """A video -> F,3,H,W float in [0,1].

    A directory is read as its image files in sorted name order (frames must share one
    size). A video file needs a decoder: torchvision.io with PyAV, or torchcodec.
    `num_frames` keeps that many evenly spaced frames.
    """
    p = Path(source)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise MediaError(f"{p}: frame directory holds no image files")
        frames = [load_image(f) for f in files]
        shapes = {tuple(f.shape) for f in frames}
        if len(shapes) > 1:
            raise MediaError(f"{p}: frames differ in size {sorted(shapes)}")
        video = torch.stack(frames)
    elif p.is_file():
        video = _decode_video_file(p)
    else:
        raise MediaError(f"{p}: video file or frame directory not found")
    if num_frames is not None and num_frames < len(video):
        idx = torch.linspace(0, len(video) - 1, num_frames).round().long()
        video = video[idx]
    return video


def _decode_video_file(p: Path) -> Tensor:
    errors = []
    try:
        from torchcodec.decoders import VideoDecoder  # type: ignore[import-not-found]

        try:
            frames = VideoDecoder(str(p))[:]  # F,3,H,W uint8
            return frames.float() / 255.0
        except Exception as e:  # corrupt file
            raise MediaError(f"{p}: not a readable video ({e})") from None
    except ImportError as e:
        errors.append(f"torchcodec: {e}")
    try:
        import av  # noqa: F401  (torchvision.io.read_video needs PyAV)
        import torchvision

        try:
            frames, _, _ = torchvision.io.read_video(str(p), pts_unit="sec", output_format="TCHW")
        except Exception as e:
            raise MediaError(f"{p}: not a readable video ({e})") from None
        if len(frames) == 0:
            raise MediaError(f"{p}: no frames decoded (corrupt or empty video)")
        return frames.float() / 255.0
    except ImportError as e:
        errors.append(f"PyAV: {e}")
    raise MediaError(f"{p}: no video decoder installed (pip install torchcodec or av), or pass a directory of frames")


def load_audio(source: str | Path) -> tuple[Tensor, int]:
    """An audio file -> (C,T float in [-1,1], sample_rate).

    PCM WAV is read with the standard library; other formats (FLAC, OGG, ...) with soundfile
    or torchaudio when installed.
    """
    p = Path(source)
    if not p.is_file():
        raise MediaError(f"{p}: audio file not found")
    if p.suffix.lower() == ".wav":
        try:
            return _read_wav(p)
        except MediaError:
            raise
        except Exception as e:  # e.g. float WAV (format 3): fall through to soundfile / torchaudio
            wav_error = e
    else:
        wav_error = None
    try:
        import soundfile  # type: ignore[import-not-found]

        try:
            data, sr = soundfile.read(str(p), dtype="float32", always_2d=True)
        except Exception as e:
            raise MediaError(f"{p}: not a readable audio file ({e})") from None
        return torch.from_numpy(data.T.copy()), int(sr)
    except ImportError:
        pass
    try:
        import torchaudio

        wave, sr = torchaudio.load(str(p))
        return wave.float(), int(sr)
    except ImportError:
        pass
    except Exception as e:
        if "torchcodec" in str(e).lower():
            raise MediaError(
                f"{p}: no decoder for this format (pip install soundfile or torchcodec)"
                + (f"; WAV reader said: {wav_error}" if wav_error else "")
            ) from None
        raise MediaError(f"{p}: not a readable audio file ({e})") from None
    raise MediaError(f"{p}: no decoder for this format (pip install soundfile)")


def _read_wav(p: Path) -> tuple[Tensor, int]:
    import wave

    try:
        with wave.open(str(p), "rb") as w:
            ch, width, sr, n = w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()
            raw = w.readframes(n)
    except wave.Error as e:
        if "unknown format" in str(e):
            raise  # e.g. IEEE float WAV: let the caller try soundfile / torchaudio
        raise MediaError(f"{p}: not a readable WAV file ({e})") from None
    except EOFError:
        raise MediaError(f"{p}: truncated WAV file") from None
    if width == 1:
        a = (np.frombuffer(raw, dtype=np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width == 2:
        a = np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0
    elif width == 3:
        b = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        a = (np.where(v >= 1 << 23, v - (1 << 24), v)).astype(np.float32) / float(1 << 23)
    elif width == 4:
        a = np.frombuffer(raw, dtype="<i4").astype(np.float32) / float(1 << 31)
    else:
        raise MediaError(f"{p}: unsupported WAV sample width {width}")
    if a.size != n * ch:
        raise MediaError(f"{p}: truncated WAV file ({a.size} samples, header says {n * ch})")
    return torch.from_numpy(a.reshape(-1, ch).T.copy()), int(sr)


def save_wav(path: str | Path, audio: Tensor, sample_rate: int) -> None:
    """C,T (or T) float in [-1,1] -> 16-bit PCM WAV (standard library)."""
    import wave

    a = audio.detach().float().cpu()
    if a.ndim == 1:
        a = a[None]
    pcm = (a.clamp(-1, 1) * 32767.0).round().to(torch.int16).T.contiguous().numpy()
    with wave.open(str(path), "wb") as w:
        w.setnchannels(a.shape[0])
        w.setsampwidth(2)
        w.setframerate(int(sample_rate))
        w.writeframes(pcm.tobytes())
