"""Exact ("gold") evaluator of the toy audio world: does a clip satisfy its beep caption?

Pipeline (any sample rate; the clip is mixed to mono):

1. A short-time RMS envelope (`FRAME_MS` windows every `HOP_MS`); frames whose RMS exceeds
   `THRESHOLD` are *active*. Active runs separated by less than `MERGE_MS` are one segment;
   segments shorter than `MIN_BEEP_MS` are clicks and ignored. Each segment is a beep.
2. A beep's pitch: the spectral peak of its samples (Hann window, zero-padded FFT, parabolic
   interpolation of the log magnitude around the peak), named by the nearest of 220 / 440 /
   880 Hz on a log scale; the beep is *in tune* when the peak lies within a quarter tone
   (50 cents) of that pitch.

`gold_score_audio` returns per-constraint booleans (each True for constraints a caption does
not have):

    count           exactly as many beeps as the caption names
    pitch           every beep is in tune, and each named pitch occurs at least as often as named
    order           sequence captions: the named pitches occur in the named order (as a
                    subsequence of the detected beeps); True for single / count captions
    no_extra_beeps  no more beeps than named
    correct         all of the above (the detected pitch sequence is the caption's, in tune)

`gold_report_audio` scores a batch: accuracy overall, per caption kind and per constraint.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence

import numpy as np

from .audio_world import KINDS, PITCHES, parse_audio

FRAME_MS = 10.0
HOP_MS = 5.0
THRESHOLD = 0.05  # RMS; a beep's RMS is amplitude / sqrt(2) >= 0.21, the noise floor's 0.003
MERGE_MS = 40.0
MIN_BEEP_MS = 50.0
QUARTER_TONE_CENTS = 50.0
AUDIO_CONSTRAINTS = ("count", "pitch", "order", "no_extra_beeps")

_NAMES = tuple(PITCHES)
_FREQS = np.array([PITCHES[n] for n in _NAMES])


def to_mono(waveform) -> np.ndarray:
    """[T], [C, T] (or a torch tensor of either) -> float64 [T]."""
    if hasattr(waveform, "detach"):
        waveform = waveform.detach().float().cpu().numpy()
    a = np.asarray(waveform, dtype=np.float64)
    if a.ndim == 2:
        a = a.mean(0)
    if a.ndim != 1:
        raise ValueError(f"expected a waveform [T] or [C, T], got shape {a.shape}")
    return a


def envelope(wave: np.ndarray, sample_rate: int) -> tuple[np.ndarray, int, int]:
    """Frame RMS [F] with its frame and hop length in samples."""
    frame = max(1, round(FRAME_MS * sample_rate / 1000))
    hop = max(1, round(HOP_MS * sample_rate / 1000))
    if len(wave) < frame:
        return np.zeros(0), frame, hop
    n = 1 + (len(wave) - frame) // hop
    idx = np.arange(frame)[None, :] + hop * np.arange(n)[:, None]
    return np.sqrt((wave[idx] ** 2).mean(1)), frame, hop


def segments(wave: np.ndarray, sample_rate: int) -> list[tuple[int, int]]:
    """(start, end) sample ranges of the beeps: runs of active frames, merged and filtered."""
    rms, frame, hop = envelope(wave, sample_rate)
    active = rms > THRESHOLD
    runs, i = [], 0
    while i < len(active):
        if active[i]:
            j = i
            while j + 1 < len(active) and active[j + 1]:
                j += 1
            runs.append([i * hop, j * hop + frame])
            i = j + 1
        else:
            i += 1
    merged: list[list[int]] = []
    for s, e in runs:
        if merged and s - merged[-1][1] < MERGE_MS * sample_rate / 1000:
            merged[-1][1] = e
        else:
            merged.append([s, e])
    min_len = MIN_BEEP_MS * sample_rate / 1000
    return [(s, min(e, len(wave))) for s, e in merged if e - s >= min_len]


def peak_frequency(x: np.ndarray, sample_rate: int) -> float:
    """The spectral peak (Hz) of `x`: Hann window, FFT zero-padded to >= 2^16 points, parabolic
    interpolation of the log magnitude around the peak bin."""
    n_fft = max(1 << 16, 1 << int(np.ceil(np.log2(len(x)))))
    mag = np.abs(np.fft.rfft((x - x.mean()) * np.hanning(len(x)), n_fft))
    k = int(np.argmax(mag[1:])) + 1
    if 1 <= k < len(mag) - 1:
        a, b, c = np.log(mag[k - 1 : k + 2] + 1e-30)
        denom = a - 2 * b + c
        k = k + (0.5 * (a - c) / denom if denom != 0 else 0.0)
    return float(k * sample_rate / n_fft)


def name_pitch(freq: float) -> tuple[str, float]:
    """(nearest pitch name on a log scale, distance to it in cents)."""
    cents = 1200.0 * np.log2(max(freq, 1e-9) / _FREQS)
    i = int(np.argmin(np.abs(cents)))
    return _NAMES[i], float(cents[i])


def detect_beeps(waveform, sample_rate: int) -> list[dict]:
    """The beeps of a clip: [{start_s, end_s, freq, pitch, cents, in_tune}] in time order."""
    wave = to_mono(waveform)
    out = []
    for s, e in segments(wave, sample_rate):
        freq = peak_frequency(wave[s:e], sample_rate)
        pitch, cents = name_pitch(freq)
        out.append(
            {
                "start_s": s / sample_rate,
                "end_s": e / sample_rate,
                "freq": freq,
                "pitch": pitch,
                "cents": cents,
                "in_tune": abs(cents) <= QUARTER_TONE_CENTS,
            }
        )
    return out


def _is_subsequence(want: Sequence[str], have: Sequence[str]) -> bool:
    it = iter(have)
    return all(any(h == w for h in it) for w in want)


def gold_score_audio(waveform, sample_rate: int, caption: str) -> dict:
    """Per-constraint results of one clip against its caption (module docstring)."""
    p = parse_audio(caption)
    beeps = detect_beeps(waveform, sample_rate)
    got = [b["pitch"] for b in beeps]
    want = list(p.pitches)
    have = Counter(got)
    res = {
        "count": len(got) == len(want),
        "pitch": all(b["in_tune"] for b in beeps) and all(have[k] >= v for k, v in Counter(want).items()),
        "order": _is_subsequence(want, got) if p.kind == "sequence" else True,
        "no_extra_beeps": len(got) <= len(want),
    }
    res["correct"] = all(res.values())
    return {**res, "kind": p.kind, "caption": caption, "detected": got, "beeps": beeps}


def _clips(audio) -> list:
    """A [B, C, T] / [B, T] tensor or array, or a sequence of clips -> a list of clips."""
    if hasattr(audio, "detach") or isinstance(audio, np.ndarray):
        if audio.ndim not in (2, 3):
            raise ValueError(f"expected audio as B,C,T, got shape {tuple(audio.shape)}")
        return [a for a in audio]
    return list(audio)


def gold_report_audio(audio, sample_rate: int, prompts: Sequence[str]) -> dict:
    """Gold accuracy of a batch of clips [B, C, T] (or a list of clips) at `sample_rate`:
    {"accuracy", "n", "per_kind", "n_per_kind", "per_constraint", "compositional", "scores"};
    "compositional" is the accuracy over count and sequence captions (more than one beep)."""
    clips = _clips(audio)
    if len(clips) != len(prompts):
        raise ValueError(f"{len(clips)} clips but {len(prompts)} captions")
    scores = [gold_score_audio(a, sample_rate, c) for a, c in zip(clips, prompts)]
    by_kind = defaultdict(list)
    for s in scores:
        by_kind[s["kind"]].append(s["correct"])
    comp = [s["correct"] for s in scores if s["kind"] != "single"]
    n = max(1, len(scores))
    return {
        "accuracy": sum(s["correct"] for s in scores) / n,
        "n": len(scores),
        "per_kind": {k: float(np.mean(by_kind[k])) for k in KINDS if by_kind[k]},
        "n_per_kind": {k: len(by_kind[k]) for k in KINDS if by_kind[k]},
        "per_constraint": {c: float(np.mean([s[c] for s in scores])) if scores else 0.0 for c in AUDIO_CONSTRAINTS},
        "compositional": float(np.mean(comp)) if comp else float("nan"),
        "scores": scores,
    }


def gold_evaluator_audio(audio, prompts: Sequence[str], sample_rate: int | None = None) -> dict:
    """The registered gold evaluator `toy_audio`: `fn(audio, prompts)` like the image one, where
    `audio` is a `Samples` (its audio and sample_rate are read) or clips at `sample_rate`
    (default 16 kHz)."""
    from .audio_world import SAMPLE_RATE

    if hasattr(audio, "require"):  # mmalign.types.Samples
        sample_rate = audio.sample_rate or sample_rate
        audio = audio.require("audio", "gold evaluator 'toy_audio'")
    return gold_report_audio(audio, int(sample_rate or SAMPLE_RATE), prompts)


gold_evaluator_audio.modality = "audio"  # type: ignore[attr-defined]
