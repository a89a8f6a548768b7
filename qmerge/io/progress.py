"""Progress of every step that takes more than a few seconds (demo conversion and fine-tune, merge,
verify, GPTQ per layer, drift per candidate and window), with an estimate of the time left.

On a terminal it is a tqdm bar. Anywhere else (a log file under nohup, Slurm or CI) a bar draws
nothing useful (tqdm redraws one line with carriage returns), so a plain line is printed instead,
at least every QMERGE_PROGRESS_INTERVAL seconds (default 30) from a timer thread, so that a single
step longer than the interval (one GPTQ layer of a 70B model) still shows the run is alive, and a
last line when the step ends. `--quiet` (progress=False in the API) turns both off.

Whether bars show is decided per call (`enabled`) or, when a caller leaves it to its context, by
the innermost `showing(...)` block: the API's entry points open one, so the library is silent
unless asked and the CLI shows progress unless --quiet.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from typing import TextIO, TypeVar

INTERVAL_ENV = "QMERGE_PROGRESS_INTERVAL"
DEFAULT_INTERVAL = 30.0

_shown: contextvars.ContextVar[bool] = contextvars.ContextVar("qmerge_progress", default=False)
T = TypeVar("T")


@contextlib.contextmanager
def showing(enabled: bool) -> Iterator[None]:
    """Within this block, bars whose caller passes enabled=None show (True) or stay silent (False)."""
    token = _shown.set(enabled)
    try:
        yield
    finally:
        _shown.reset(token)


def interval() -> float:
    """Seconds between plain progress lines (QMERGE_PROGRESS_INTERVAL; tests set it short)."""
    try:
        return max(0.01, float(os.environ.get(INTERVAL_ENV, DEFAULT_INTERVAL)))
    except ValueError:
        return DEFAULT_INTERVAL


def clock(seconds: float) -> str:
    """H:MM:SS or M:SS."""
    s = int(round(seconds))
    h, rest = divmod(s, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


class Progress:
    """`total` steps of `unit` named `desc`: a bar on a terminal, timed plain lines elsewhere."""

    def __init__(self, total: int, desc: str, unit: str, enabled: bool | None = None, stream: TextIO | None = None):
        self.total, self.desc, self.unit = max(0, int(total)), desc, unit
        self.units = unit + ("es" if unit.endswith(("s", "sh", "ch", "x")) else "s")
        self.done, self.what = 0, ""
        self.stream = stream or sys.stderr
        self.enabled = _shown.get() if enabled is None else enabled
        self.start = time.monotonic()
        self._bar = self._stop = self._ticker = None
        self._lines = 0
        if not self.enabled:
            return
        if _is_terminal(self.stream):
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, desc=desc, unit=unit, file=self.stream, leave=False, dynamic_ncols=True)
        else:
            self._stop = threading.Event()
            self._ticker = threading.Thread(target=self._tick, args=(interval(),), name=f"qmerge-progress-{desc}", daemon=True)
            self._ticker.start()

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)

    def note(self, what: str) -> None:
        """What is being worked on now (a candidate's name): shown after the counts."""
        self.what = what
        if self._bar is not None:
            self._bar.set_postfix_str(what, refresh=False)

    def line(self) -> str:
        """The plain progress line: done/total, elapsed, the estimate of what is left."""
        elapsed = time.monotonic() - self.start
        share = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        eta = clock(elapsed / self.done * (self.total - self.done)) if self.done else "unknown"
        what = f" [{self.what}]" if self.what else ""
        return f"[qmerge] {self.desc}: {self.done}/{self.total} {self.units}{share}, {clock(elapsed)} elapsed, ETA {eta}{what}"

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._stop is not None and not self._stop.is_set():
            self._stop.set()
            self._ticker.join()
            if self._lines:  # a step that outlasted the interval says when it ended; a short one stays silent
                self._print(f"[qmerge] {self.desc}: {self.done}/{self.total} {self.units} in {clock(time.monotonic() - self.start)}")

    def _tick(self, every: float) -> None:
        while not self._stop.wait(every):
            self._print(self.line())
            self._lines += 1

    def _print(self, text: str) -> None:
        try:
            print(text, file=self.stream, flush=True)
        except (OSError, ValueError):  # the stream went away (a closed log): progress is not worth failing for
            pass

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def track(items: Iterable[T], desc: str, unit: str, total: int | None = None, enabled: bool | None = None, stream: TextIO | None = None) -> Iterator[T]:
    """Iterate over `items`, one step each."""
    items = list(items) if total is None and not hasattr(items, "__len__") else items
    with Progress(len(items) if total is None else total, desc, unit, enabled, stream) as bar:
        for item in items:
            yield item
            bar.update()


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
