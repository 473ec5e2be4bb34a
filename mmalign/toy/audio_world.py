"""The toy audio world: beep clips, their captions, a renderer that plays a correct clip, and a
fixed split (the audio counterpart of the shapes world, world.py; the gold evaluator is
audio_gold.py).

Clips are 1.0 s mono at 16 kHz. A *beep* is a sine tone at one of three pitches (low 220 Hz,
mid 440 Hz, high 880 Hz) lasting 150-250 ms, with 10 ms linear fades in and out and an
amplitude of 0.3-0.6; beeps are separated by at least 100 ms of silence, and white noise at
-50 dBFS (RMS 10^(-50/20) of full scale) runs through the whole clip. Captions come from a
small grammar with three *kinds*:

    single     one {pitch} beep
    count      two {pitch} beeps / three {pitch} beeps
    sequence   a {pitch} beep then a {pitch} beep [then a {pitch} beep]
               (ordered; not all pitches equal, which a count caption says)

Every caption names a distinct beep sequence (the pitches in time order). The train /
held-out split holds out sequences by a fixed hash of the caption: a held-out caption's
pitch order never occurs in training, and every kind appears in both splits.
"""

from __future__ import annotations

import hashlib
import itertools
import random
import re
from dataclasses import dataclass
from functools import cache

import numpy as np

SAMPLE_RATE = 16000
DURATION_S = 1.0
NUM_SAMPLES = int(SAMPLE_RATE * DURATION_S)
PITCHES: dict[str, float] = {"low": 220.0, "mid": 440.0, "high": 880.0}
PITCH_NAMES = tuple(PITCHES)
NUMBERS = {"one": 1, "two": 2, "three": 3}
KINDS = ("single", "count", "sequence")
BEEP_MS = (150, 250)  # beep duration range (fades included)
FADE_MS = 10  # linear fade in and out
GAP_MS = 100  # minimum silence between two beeps
EDGE_MS = 20  # minimum silence before the first and after the last beep
AMPLITUDE = (0.3, 0.6)
NOISE_DBFS = -50.0


@dataclass(frozen=True)
class AudioParsed:
    """A caption's meaning: its kind and the pitch of every beep in time order."""

    kind: str
    pitches: tuple[str, ...]


_COUNT = re.compile(r"^(one|two|three) (\w+) beeps?$")
_SEQ = re.compile(r"^a (\w+) beep then a (\w+) beep(?: then a (\w+) beep)?$")


def _check_pitch(p: str, caption: str) -> str:
    if p not in PITCHES:
        raise ValueError(f"caption {caption!r}: unknown pitch {p!r} (one of {', '.join(PITCH_NAMES)})")
    return p


def parse_audio(caption: str) -> AudioParsed:
    """Parse a caption of the beep grammar; ValueError naming the caption otherwise."""
    text = caption.strip().lower()
    m = _COUNT.match(text)
    if m:
        n = NUMBERS[m[1]]
        if (n == 1) != text.endswith("beep"):
            raise ValueError(f"caption {caption!r} is not in the beep grammar (number and plural disagree)")
        return AudioParsed("single" if n == 1 else "count", (_check_pitch(m[2], caption),) * n)
    m = _SEQ.match(text)
    if m:
        pitches = tuple(_check_pitch(p, caption) for p in m.groups() if p is not None)
        return AudioParsed("sequence", pitches)
    raise ValueError(f"caption {caption!r} is not in the beep grammar")


def audio_caption_kind(caption: str) -> str:
    """One of KINDS: 'single', 'count', 'sequence'."""
    return parse_audio(caption).kind


def make_audio_caption(pitches: tuple[str, ...] | list[str]) -> str:
    """The caption of a beep sequence: a count caption when all pitches are equal, else a sequence."""
    pitches = tuple(pitches)
    if not 1 <= len(pitches) <= 3:
        raise ValueError(f"a caption names 1-3 beeps, got {len(pitches)}")
    if len(set(pitches)) == 1:
        word = {v: k for k, v in NUMBERS.items()}[len(pitches)]
        return f"{word} {pitches[0]} beep" + ("s" if len(pitches) > 1 else "")
    return " then ".join(f"a {p} beep" for p in pitches)


@cache
def all_audio_captions() -> tuple[str, ...]:
    """Every caption of the grammar (39), in a fixed order."""
    caps = [make_audio_caption((p,) * n) for n in (1, 2, 3) for p in PITCH_NAMES]
    for n in (2, 3):
        caps += [make_audio_caption(s) for s in itertools.product(PITCH_NAMES, repeat=n) if len(set(s)) > 1]
    return tuple(caps)


def _heldout(caption: str) -> bool:
    # a fixed hash of the caption (not Python's salted hash()): about 1 in 4 held out
    h = int(hashlib.sha256(("toy-audio-split-v1:" + caption).encode()).hexdigest()[:8], 16)
    return h % 4 == 0


@cache
def audio_heldout_captions() -> tuple[str, ...]:
    return tuple(c for c in all_audio_captions() if _heldout(c))


@cache
def audio_train_captions() -> tuple[str, ...]:
    return tuple(c for c in all_audio_captions() if not _heldout(c))


# ---------------------------------------------------------------------------- render


@dataclass(frozen=True)
class Beep:
    pitch: str
    start: int  # first sample
    length: int  # samples, fades included
    amplitude: float
    phase: float


def _rng(caption: str, seed: int) -> np.random.Generator:
    return np.random.default_rng(int(hashlib.sha256(f"{caption}|{seed}".encode()).hexdigest()[:16], 16))


def beep_layout(caption: str, seed: int = 0) -> list[Beep]:
    """Deterministic placement of the caption's beeps: durations, onsets, amplitudes, phases."""
    p = parse_audio(caption)
    rng = _rng(caption, seed)
    ms = SAMPLE_RATE // 1000
    n = len(p.pitches)
    lengths = [int(rng.integers(BEEP_MS[0], BEEP_MS[1] + 1)) * ms for _ in range(n)]
    fixed = sum(lengths) + (n - 1) * GAP_MS * ms + 2 * EDGE_MS * ms
    free = NUM_SAMPLES - fixed
    assert free >= 0, caption
    cuts = np.sort(rng.integers(0, free + 1, size=n))  # free silence split over n+1 slots
    slots = np.diff(np.concatenate([[0], cuts, [free]]))
    beeps, t = [], EDGE_MS * ms + int(slots[0])
    for i, pitch in enumerate(p.pitches):
        amp = float(rng.uniform(*AMPLITUDE))
        beeps.append(Beep(pitch, t, lengths[i], amp, float(rng.uniform(0, 2 * np.pi))))
        t += lengths[i] + GAP_MS * ms + int(slots[i + 1])
    return beeps


def synthesize(beeps: list[Beep], noise_seed: int, noise_dbfs: float = NOISE_DBFS) -> np.ndarray:
    """Beeps (explicit placement) plus white noise at `noise_dbfs` -> float32 [NUM_SAMPLES] in [-1, 1]."""
    noise_rms = 10.0 ** (noise_dbfs / 20.0)
    out = np.random.default_rng(noise_seed).normal(0.0, noise_rms, NUM_SAMPLES)
    fade = FADE_MS * SAMPLE_RATE // 1000
    for b in beeps:
        t = np.arange(b.length) / SAMPLE_RATE
        env = np.minimum(1.0, np.minimum(np.arange(b.length) + 1, b.length - np.arange(b.length)) / fade)
        tone = b.amplitude * env * np.sin(2 * np.pi * PITCHES[b.pitch] * t + b.phase)
        end = min(NUM_SAMPLES, b.start + b.length)
        out[b.start : end] += tone[: end - b.start]
    return np.clip(out, -1.0, 1.0).astype(np.float32)


def render_audio(caption: str, seed: int = 0) -> tuple[np.ndarray, int]:
    """A correct clip for `caption` (deterministic in (caption, seed)): (waveform float32 [T] in
    [-1, 1], 16000)."""
    beeps = beep_layout(caption, seed)
    noise_seed = int(_rng(caption, seed).integers(0, 2**31)) ^ 0x5EED
    return synthesize(beeps, noise_seed), SAMPLE_RATE


# -------------------------------------------------------------- hard negatives

AUDIO_PERTURBATIONS = ("pitch", "count", "swap")


def perturb_audio_caption(caption: str, rng: random.Random, mode: str | None = None) -> str | None:
    """A caption that the clip of `caption` does NOT satisfy (a hard negative).

    mode: 'pitch' (one beep's pitch changed; for a count caption, all of them), 'count' (one
    beep more or fewer, same pitches: a count caption's number changes, a sequence gains a
    repeat of one of its beeps or loses one), 'swap' (two beeps of different pitch exchanged:
    the order; sequences only) or None for a random applicable one. Returns None when the mode
    does not apply.
    """
    p = parse_audio(caption)
    seq = list(p.pitches)
    modes = ["pitch", "count"] + (["swap"] if p.kind == "sequence" else [])
    if mode is None:
        mode = rng.choice(modes)
    elif mode not in modes:
        return None
    if mode == "pitch":
        if p.kind == "sequence":
            i = rng.randrange(len(seq))
            seq[i] = rng.choice([x for x in PITCH_NAMES if x != seq[i]])
        else:
            seq = [rng.choice([x for x in PITCH_NAMES if x != seq[0]])] * len(seq)
    elif mode == "count":
        options = [n for n in (1, 2, 3) if n != len(seq)]
        n = rng.choice(options)
        if n < len(seq):
            del seq[rng.randrange(len(seq))]
            if n < len(seq):
                del seq[rng.randrange(len(seq))]
        else:
            while len(seq) < n:
                i = rng.randrange(len(seq))
                seq.insert(i, seq[i])
    elif mode == "swap":
        pairs = [(i, j) for i in range(len(seq)) for j in range(i + 1, len(seq)) if seq[i] != seq[j]]
        i, j = rng.choice(pairs)
        seq[i], seq[j] = seq[j], seq[i]
    out = make_audio_caption(seq)
    return None if out == caption else out
