"""Library progress in the Prefect run's log: what ``mip_core.progress`` reports during a task shows in the UI."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from prefect import get_run_logger

from mip_core.progress import LOGGER


class _ToRunLogger(logging.Handler):
    def __init__(self, run_logger: logging.LoggerAdapter) -> None:  # type: ignore[type-arg]
        super().__init__(logging.INFO)
        self.run_logger = run_logger

    def emit(self, record: logging.LogRecord) -> None:
        self.run_logger.log(record.levelno, record.getMessage())


@contextmanager
def forward_progress() -> Iterator[None]:
    """``with forward_progress():`` inside a task: progress lines of training, attribution, editing and evaluation
    are logged to the task run (handler removed in ``finally``)."""
    handler = _ToRunLogger(get_run_logger())
    LOGGER.addHandler(handler)
    level = LOGGER.level
    LOGGER.setLevel(logging.INFO)
    try:
        yield
    finally:
        LOGGER.removeHandler(handler)
        LOGGER.setLevel(level)
