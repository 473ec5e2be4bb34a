"""Progress bars that do not flood a log file.

Every long step draws a tqdm bar (training, sampling pairs, evaluation, and the libraries'
own: loading and writing models). On a terminal a bar redraws in place; written to a file (a
job's log, `mmalign train ... 2> log`), each redraw would be one more line. So when stderr is
not a terminal, `throttle_when_not_a_terminal` makes every bar redraw at most once a minute
(plus its first and last state), through tqdm's own TQDM_MININTERVAL default: explicit
arguments and a TQDM_MININTERVAL set by the user still win. The command line calls it first
thing, before tqdm is imported (tqdm reads its TQDM_* defaults when it is imported).
"""

from __future__ import annotations

import os
import sys

LOG_INTERVAL_S = 60


def throttle_when_not_a_terminal(stream=None) -> bool:
    """Set tqdm's default redraw interval to LOG_INTERVAL_S when `stream` (stderr) is not a terminal;
    returns whether it did."""
    stream = sys.stderr if stream is None else stream
    try:
        interactive = stream.isatty()
    except (AttributeError, ValueError):  # no stream, or a closed one
        interactive = False
    if interactive:
        return False
    os.environ.setdefault("TQDM_MININTERVAL", str(LOG_INTERVAL_S))
    return True
