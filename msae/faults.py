"""Named points where a process can be told to stop and wait, so that a test kills it exactly there.

A kill test that sleeps a fixed time before its kill races the process: on a fast machine the work is already
done, on a busy one it has not started. Instead the test sets MSAE_PAUSE_AT to the name of a point (for example
"stream shard 1" or "train step 12 rank 1") and MSAE_PAUSE_MARKER to a file path. The process that reaches
that point writes its pid to the marker and sleeps until it is killed; the test waits for the marker, then kills.
Without MSAE_PAUSE_AT (every user run) `pause_at` is one dictionary lookup.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

PAUSE_AT = "MSAE_PAUSE_AT"
PAUSE_MARKER = "MSAE_PAUSE_MARKER"


def pause_at(point: str) -> None:
    """Wait here forever (for a kill) when MSAE_PAUSE_AT names this point; otherwise return at once."""
    if os.environ.get(PAUSE_AT) != point:
        return
    marker = os.environ.get(PAUSE_MARKER)
    if marker:
        tmp = Path(f"{marker}.{os.getpid()}.tmp")
        tmp.write_text(str(os.getpid()))
        os.replace(tmp, marker)
    while True:
        time.sleep(3600)
