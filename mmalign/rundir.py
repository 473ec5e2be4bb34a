"""Run-directory safety: one run per directory, a lock, resume bookkeeping, disk errors by name.

- `check_free`: a directory that already holds a run (config.yaml, metrics.jsonl, checkpoints/,
  final/) is refused unless the run resumes it or is told to overwrite it; `move_aside` keeps
  the old run as `<dir>.replaced-<time>` (nothing is deleted).
- `RunLock`: `<run>/.lock` records pid and host; a lock whose process is dead on this host is
  stale and taken over with a message; a live one refuses the second run.
- `resume_changes`: the config keys a resumed run may change (`RESUMABLE`) and the ones it may not.
- `truncate_metrics`: metrics.jsonl rows after the resumed step are dropped (atomically) so each
  step is logged once.
- `writing`: OSError ENOSPC / EROFS / EACCES (and torch's opaque stream errors on a full disk)
  become one line naming the path.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import yaml

RUN_MARKERS = ("config.yaml", "metrics.jsonl", "checkpoints", "final")
LOCK_NAME = ".lock"
# keys a resumed run may change: they do not touch the optimisation of the steps to come
RESUMABLE = (
    "train.steps",
    "train.log_every",
    "train.checkpoint_every",
    "train.keep_last",
    "train.skip_nonfinite",
    "train.save_rollouts_every",
    "train.report_to",
    "data.num_workers",
    "run.name",
    "run.output_dir",
)


class RunDirError(RuntimeError):
    """A run directory that cannot be used as asked (holds another run, locked, unwritable)."""


class DiskError(RunDirError):
    """A write failed because the disk is full, read-only or not writable by us."""


def existing_run(run_dir: Path) -> list[str]:
    """The run markers present in `run_dir` (empty when it holds no run)."""
    return [m for m in RUN_MARKERS if (run_dir / m).exists()]


def check_free(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """RunDirError unless a new run may start in `run_dir` (or `resume` / `overwrite` says how to use it)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"output directory {run_dir} is a file")
    found = existing_run(run_dir)
    if found and not resume and not overwrite:
        raise RunDirError(
            f"{run_dir} already holds a run ({', '.join(found)}): pass --resume to continue it "
            f"or --overwrite to move it aside and start anew"
        )
    holder = RunLock(run_dir).holder()
    if holder is not None:
        raise RunDirError(_locked_message(run_dir, holder))


def move_aside(run_dir: Path) -> Path | None:
    """Rename an existing run to `<run_dir>.replaced-<UTC time>`; return the new path (None: nothing to move)."""
    if not existing_run(run_dir):
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    dest = run_dir.with_name(f"{run_dir.name}.replaced-{stamp}")
    n = 1
    while dest.exists():
        dest, n = run_dir.with_name(f"{run_dir.name}.replaced-{stamp}-{n}"), n + 1
    run_dir.rename(dest)
    return dest


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _locked_message(run_dir: Path, holder: dict) -> str:
    return (
        f"{run_dir} is in use by another run (pid {holder.get('pid')} on {holder.get('host')}, lock file "
        f"{run_dir / LOCK_NAME}); wait for it, or delete the lock file if that run is gone"
    )


class RunLock:
    """`<run_dir>/.lock` with this process's pid and host; stale locks (dead pid on this host) are taken over."""

    def __init__(self, run_dir: Path, log: Callable[[str], None] = print):
        self.path = Path(run_dir) / LOCK_NAME
        self.log = log
        self.held = False

    def _read(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (ValueError, OSError):
            return {}  # being written, or garbled by a crash

    def holder(self) -> dict | None:
        """The live run holding the lock, or None (no lock, or a stale one)."""
        info = self._read()
        if info is None or self._stale(info):
            return None
        return info

    def _stale(self, info: dict) -> bool:
        if not info:  # unreadable: stale once it is older than a writer could take
            try:
                return time.time() - self.path.stat().st_mtime > 10
            except FileNotFoundError:
                return True
        return info.get("host") == socket.gethostname() and not _alive(int(info.get("pid", -1)))

    def acquire(self) -> None:
        """Take the lock or raise RunDirError naming its holder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                info = self._read()
                if info is None:
                    continue
                if not self._stale(info):
                    raise RunDirError(_locked_message(self.path.parent, info)) from None
                self.log(
                    f"taking over the stale lock {self.path} (pid {info.get('pid')} on {info.get('host')} is gone)"
                )
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
                continue
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
            self.held = True
            return
        raise RunDirError(f"could not take the lock {self.path}")

    def release(self) -> None:
        """Remove the lock if this process holds it."""
        if self.held:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            self.held = False


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def resume_changes(old_yaml: str, new_yaml: str) -> tuple[list[str], list[str]]:
    """(changes a resume may apply, changes it may not) between two dumped configs, as dotted keys."""
    old, new = _flatten(yaml.safe_load(old_yaml) or {}), _flatten(yaml.safe_load(new_yaml) or {})
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    ok = [k for k in changed if k in RESUMABLE]
    return ok, [k for k in changed if k not in RESUMABLE]


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file and a rename: readers see old or new, never half."""
    tmp = path.with_name(f".tmp-{path.name}")
    with writing(path):
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


def truncate_metrics(path: Path, step: int) -> int:
    """Drop metrics.jsonl rows logged after `step` (and a torn last line); return how many were dropped."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            dropped += 1
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] > step:
            dropped += 1
            continue
        kept.append(line)
    if dropped:
        write_atomic(path, "".join(line + "\n" for line in kept))
    return dropped


def _existing_parent(path: Path) -> Path:
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def disk_problem(path: Path, e: BaseException) -> str | None:
    """One line naming why writing `path` failed when the cause is the disk, else None."""
    where = getattr(e, "filename", None) or path
    code = getattr(e, "errno", None)
    if code in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        return f"disk full while writing {where}"
    if code == errno.EROFS:
        return f"read-only file system: cannot write {where}"
    if code in (errno.EACCES, errno.EPERM):
        return f"permission denied: {where}"
    if isinstance(e, RuntimeError):  # torch.save / safetensors hide the errno ("iostream error", "write failed")
        here = _existing_parent(path)
        with contextlib.suppress(OSError):
            if shutil.disk_usage(here).free == 0:
                return f"disk full while writing {path}"
        if not os.access(here, os.W_OK):
            return f"read-only or not writable: cannot write {path}"
    return None


@contextlib.contextmanager
def writing(path: Path) -> Iterator[None]:
    """Turn a disk-full / read-only / permission failure inside the block into one DiskError line."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        problem = disk_problem(path, e)
        if problem is None:
            raise
        raise DiskError(problem) from None
