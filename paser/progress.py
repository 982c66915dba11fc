"""Progress of long loops, and quiet logs for optional libraries.

``tqdm`` here is tqdm's, with one difference: where its output is not a terminal (a log file, a batch job's
output), it draws no bar, whose redraws would make one endless line, but logs a line with the count, the
rate and the time left, once a loop has run ``PASER_PROGRESS_S`` seconds (60 by default) and then at most
that often, and its last state when it ends (a shorter loop logs nothing, or that last line only if it
redraws on its own, as one that sets a postfix every step does).
"""

from __future__ import annotations

import logging
import os
import sys
import time

from tqdm.auto import tqdm as _tqdm

from paser.errors import ConfigError

log = logging.getLogger("paser.progress")

# faiss tries its AVX-512 and AVX2 builds first and logs each missing one with a ModuleNotFoundError at
# INFO, which reads as a failure; the loader's warnings still show
logging.getLogger("faiss.loader").setLevel(logging.WARNING)

LINE = "{desc}: {n_fmt}/{total_fmt} {unit} ({percentage:.0f}%), {elapsed} elapsed, {remaining} left, {rate_fmt}{postfix}"


def interval_s() -> float:
    value = os.environ.get("PASER_PROGRESS_S", "60")
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds < float("inf"):
        raise ConfigError(f"PASER_PROGRESS_S={value!r} must be a number of seconds > 0")
    return seconds


class _LogLines:
    """A stream for tqdm that logs its redraws at most every ``seconds`` (a loop that sets its postfix each
    step redraws each step), and, when the loop ends, the last one it held back."""

    def __init__(self, seconds: float):
        self.seconds, self.last, self.held = seconds, time.monotonic(), None

    def write(self, text: str) -> None:
        line = text.strip()  # a redraw starts with a carriage return
        if line and time.monotonic() - self.last >= self.seconds:
            log.info("%s", line)
            self.last, self.held = time.monotonic(), None
        elif line:
            self.held = line

    def flush(self) -> None:
        pass

    def end(self) -> None:
        if self.held:
            log.info("%s", self.held)
            self.held = None


def on_terminal(stream) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def quiet_library_bars() -> None:
    """Off a terminal, the bars of transformers (loading weights), the hub and datasets are turned off too."""
    if on_terminal(sys.stderr):
        return
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # read when each library is imported
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:
        sys.modules["transformers"].utils.logging.disable_progress_bar()
    if "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()


NOTEBOOK = "notebook" in _tqdm.__module__  # tqdm.auto's widget in Jupyter: no stream to redraw into


class tqdm(_tqdm):  # a drop-in for tqdm.auto.tqdm
    def __init__(self, *args, **kwargs):
        self.lines = None
        if not NOTEBOOK and not kwargs.get("disable") and not on_terminal(kwargs.get("file") or sys.stderr):
            seconds = interval_s()
            self.lines = _LogLines(seconds)
            kwargs.update(file=self.lines, mininterval=seconds, maxinterval=seconds, delay=seconds, bar_format=LINE,
                          dynamic_ncols=False)
        super().__init__(*args, **kwargs)

    def close(self) -> None:
        super().close()
        if self.lines is not None:
            self.lines.end()
