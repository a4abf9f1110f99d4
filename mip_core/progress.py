"""Progress of long steps (training, attribution, editing, evaluation): a tqdm bar on a terminal, and a log line
every tenth of the way on the ``mip_core.progress`` logger everywhere.

The library does not know who watches: the CLI prints the logger's lines when stderr is not a terminal (CI logs,
``make demo | tee``), the service's tasks forward them to the Prefect run logger, and the DeepSpeed edit job writes
them to its log, which the launcher relays. ``MIP_PROGRESS=off`` hides the bar (the log lines stay).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator
from types import TracebackType
from typing import TypeVar

from tqdm.auto import tqdm

LOGGER = logging.getLogger("mip_core.progress")
MARKER = "progress "
"""Every progress line starts with this, so a relay (the edit job's log) can pick them out of other output."""

T = TypeVar("T")


def _bar_wanted() -> bool:
    setting = os.environ.get("MIP_PROGRESS", "auto").lower()
    return setting == "bar" or (setting == "auto" and sys.stderr.isatty())


class Progress:
    """``with Progress(300, "editing (RMisU)", unit="step") as p: ... p.update()``.

    Logs ``progress editing (RMisU): 90/300 step (30 %), 12 s elapsed, ~28 s left`` at every ``every`` fraction
    (and at the end), whatever the terminal; draws a bar only on a terminal.
    """

    def __init__(self, total: int, desc: str, *, unit: str = "it", every: float = 0.1, bar: bool | None = None,
                 logger: logging.Logger = LOGGER, enabled: bool = True) -> None:
        """``enabled=False``: silent (e.g. every rank of a distributed job but the first)."""
        self.total, self.desc, self.unit, self.logger = max(int(total), 0), desc, unit, logger
        self.enabled = enabled
        self.done = 0
        self._step = max(1, int(self.total * every)) if self.total else 1
        self._next = self._step
        self._t0 = time.perf_counter()
        self._bar = tqdm(total=self.total, desc=desc, unit=unit, leave=False, dynamic_ncols=True,
                         disable=not enabled or not (_bar_wanted() if bar is None else bar))
        if enabled:
            self.logger.info("%s%s: 0/%d %s", MARKER, desc, self.total, unit)

    def update(self, n: int = 1) -> None:
        self.done += n
        self._bar.update(n)
        if self.done >= self._next and self.done < self.total:
            self._log()
            while self._next <= self.done:
                self._next += self._step

    def _log(self) -> None:
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self._t0
        pct = 100.0 * self.done / self.total if self.total else 100.0
        eta = elapsed * (self.total - self.done) / self.done if self.done else float("nan")
        left = f", ~{eta:.0f} s left" if self.done < self.total and eta == eta else ""
        self.logger.info("%s%s: %d/%d %s (%.0f %%), %.0f s elapsed%s", MARKER, self.desc, self.done, self.total,
                         self.unit, pct, elapsed, left)

    def close(self) -> None:
        if not self._bar.disable:
            self._bar.close()
        self._log()  # the last line says where it stopped (a time budget may end a loop early)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class _StderrHandler(logging.Handler):
    """Writes to whatever ``sys.stderr`` is at the time (a captured or replaced stream included)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
            sys.stderr.flush()
        except Exception:  # noqa: BLE001 - logging must never break the run
            self.handleError(record)


def log_to_stderr(*, unless_terminal: bool = False) -> None:
    """Print progress lines on stderr (once per process). ``unless_terminal``: not when stderr is a terminal,
    where the bar already shows it (the CLI's choice); a job whose stderr is a log file always wants them."""
    if unless_terminal and sys.stderr.isatty():
        return
    if not sys.stderr.isatty():  # a log file: transformers' weight-loading bars would be carriage-return noise
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # read when transformers is imported
        if "transformers" in sys.modules:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
    if not any(isinstance(h, _StderrHandler) for h in LOGGER.handlers):
        LOGGER.addHandler(_StderrHandler())
    LOGGER.setLevel(logging.INFO)


def progress(iterable: Iterable[T], total: int, desc: str, *, unit: str = "it") -> Iterator[T]:
    """``for x in progress(items, len(items), "attribution", unit="item")``: :class:`Progress` over an iterable."""
    with Progress(total, desc, unit=unit) as p:
        for x in iterable:
            yield x
            p.update()


__all__ = ["LOGGER", "MARKER", "Progress", "log_to_stderr", "progress"]
