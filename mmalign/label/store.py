"""The labels of a round, kept in DIR/pairs.jsonl: every answer written atomically as it is given.

One line per pair, as `mmalign sample --label-pairs` writes it (mmalign.methods.d3po):
{"prompt", "sample_ids": [a, b], "choice": null, "tie": false, "images": [path_a, path_b]}; an
answer sets `choice` (0: the left / first sample, 1: the right) or `tie: true`, and clearing it
(undo) puts back `choice: null, tie: false`. Each answer takes a lock on the file (a lock file
beside it, so two tabs, or two servers, queue), re-reads the file, changes its one line and
replaces the file (temporary file, fsync, os.replace): a killed server loses nothing already
answered, and concurrent answers to different pairs all survive.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

PAIRS_FILE = "pairs.jsonl"
ANSWERS = {"left": (0, False), "right": (1, False), "tie": (None, True), "clear": (None, False)}
MEDIA_KINDS = {
    **dict.fromkeys((".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp"), "image"),
    **dict.fromkeys((".mp4", ".webm", ".mov", ".mkv"), "video"),
    **dict.fromkeys((".wav", ".flac", ".ogg", ".mp3"), "audio"),
}
MEDIA_KEYS = ("images", "videos", "audio", "media")  # a row's two files, under the first key present


class LabelError(ValueError):
    """Bad input to the labelling page (no pairs, a bad line, a bad answer): one line naming it."""


class StaleAnswer(LabelError):
    """The pair's answer changed since the page read it (another tab answered it)."""


class LabelStore:
    """The pairs of DIR/pairs.jsonl and their answers."""

    def __init__(self, directory: str | Path):
        from filelock import FileLock  # deferred: the `ui` extra

        self.dir = Path(directory)
        self.path = self.dir / PAIRS_FILE
        if not self.dir.is_dir():
            raise LabelError(f"{self.dir}: not a directory; give the --out of `mmalign sample --label-pairs`")
        if not self.path.is_file():
            raise LabelError(
                f"{self.dir}: no {PAIRS_FILE} to label; write a round with "
                f"`mmalign sample --label-pairs --out {self.dir}`"
            )
        self._thread_lock = threading.Lock()
        self._file_lock = FileLock(str(self.dir / f".{PAIRS_FILE}.lock"))
        if not self.rows():
            raise LabelError(f"{self.path}: no pairs (the file is empty)")

    def rows(self) -> list[dict[str, Any]]:
        """The file's pairs; a line that is not a JSON object with two media files raises LabelError."""
        rows = []
        for n, line in enumerate(self.path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                raise LabelError(f"{self.path}:{n}: not valid JSON") from None
            if not isinstance(row, dict) or len(self.media(row)) != 2:
                raise LabelError(
                    f"{self.path}:{n}: expected a pair: a JSON object with two files under "
                    f"one of {', '.join(MEDIA_KEYS)}"
                )
            rows.append(row)
        return rows

    @staticmethod
    def media(row: dict[str, Any]) -> list[str]:
        """The pair's two files (paths relative to DIR)."""
        files = next((row[k] for k in MEDIA_KEYS if isinstance(row.get(k), list)), [])
        return [f for f in files if isinstance(f, str)]

    @staticmethod
    def is_answered(row: dict[str, Any]) -> bool:
        return row.get("tie") is True or row.get("choice") in (0, 1)

    @staticmethod
    def state(row: dict[str, Any]) -> str:
        """The pair's answer as the page names it: left | right | tie | clear (unanswered)."""
        if row.get("tie") is True:
            return "tie"
        return {0: "left", 1: "right"}.get(row.get("choice"), "clear")

    def answer(self, index: int, answer: str, expected: str | None = None) -> dict[str, Any]:
        """Record `answer` (left | right | tie | clear) for pair `index`; returns the updated row.

        `expected`: the pair's answer as the caller last saw it; if the file now says otherwise
        (another tab answered meanwhile), nothing is written and StaleAnswer is raised.
        """
        if answer not in ANSWERS:
            raise LabelError(f"answer {answer!r}: expected one of {', '.join(ANSWERS)}")
        choice, tie = ANSWERS[answer]
        with self._thread_lock, self._file_lock:
            rows = self.rows()
            if not 0 <= index < len(rows):
                raise LabelError(f"pair {index}: out of range (the file has {len(rows)} pairs)")
            if expected is not None and self.state(rows[index]) != expected:
                raise StaleAnswer(
                    f"pair {index + 1} was answered meanwhile (another tab?): it is now {self.state(rows[index])}"
                )
            rows[index]["choice"], rows[index]["tie"] = choice, tie
            self._write(rows)
            return rows[index]

    def _write(self, rows: list[dict[str, Any]]) -> None:
        fd, tmp = tempfile.mkstemp(prefix=f".{PAIRS_FILE}.", dir=self.dir)
        try:
            with os.fdopen(fd, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def media_path(self, relative: str) -> Path | None:
        """A file of DIR named by a pair (None for anything outside DIR or not named by a pair)."""
        allowed = {f for row in self.rows() for f in self.media(row)}
        if relative not in allowed:
            return None
        path = (self.dir / relative).resolve()
        return path if path.is_file() and path.is_relative_to(self.dir.resolve()) else None

    def summary(self) -> dict[str, Any]:
        """The pairs for the page: index, prompt, the two files (url, kind), the answer."""
        pairs = []
        for i, row in enumerate(self.rows()):
            media = [
                {"url": "media/" + f, "kind": MEDIA_KINDS.get(Path(f).suffix.lower(), "image")} for f in self.media(row)
            ]
            pairs.append(
                {
                    "index": i,
                    "prompt": row.get("prompt", ""),
                    "media": media,
                    "choice": row.get("choice"),
                    "tie": row.get("tie") is True,
                    "state": self.state(row),
                }
            )
        return {"pairs": pairs, "total": len(pairs), "done": sum(self.is_answered(p) for p in pairs)}
