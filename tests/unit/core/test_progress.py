"""Progress bars redraw at most once a minute when stderr is a file, not a terminal."""

import subprocess
import sys

from tests.helpers import ROOT

LOOP = "import time\nfrom tqdm.auto import tqdm\nfor _ in tqdm(range(40), desc='work'):\n    time.sleep(0.02)\n"


def _redraws(code: str, tmp_path) -> int:
    log = tmp_path / "log.txt"
    with open(log, "w") as f:
        subprocess.run(
            [sys.executable, "-c", code],
            cwd=ROOT,
            stderr=f,
            check=True,
            timeout=60,
            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
        )
    return log.read_bytes().count(b"\r")


def test_the_command_line_throttles_bars_written_to_a_log(tmp_path):
    plain = _redraws(LOOP, tmp_path)
    throttled = _redraws("import mmalign.progress as p\np.throttle_when_not_a_terminal()\n" + LOOP, tmp_path)
    assert plain >= 5  # tqdm's default: ten redraws a second
    assert throttled <= 3  # the first state, the last, the close
    cli = "import mmalign.cli\n" + LOOP  # the command line does it when it is imported
    assert _redraws(cli, tmp_path) <= 3


def test_a_terminal_is_left_alone(monkeypatch):
    from mmalign.progress import throttle_when_not_a_terminal

    class Tty:
        def isatty(self):
            return True

    monkeypatch.delenv("TQDM_MININTERVAL", raising=False)
    assert throttle_when_not_a_terminal(Tty()) is False
    import os

    assert "TQDM_MININTERVAL" not in os.environ
