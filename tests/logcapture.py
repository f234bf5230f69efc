"""Test support: run a function while collecting the lines the 'normyolo' logger emits."""
from __future__ import annotations

import logging
from typing import Any, Callable

from utils.general import LOGGER


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.extend(record.getMessage().splitlines())


def call_logged(fn: Callable[..., Any], *args: Any) -> tuple[Any, list[str]]:
    """(fn(*args), the log lines emitted meanwhile, multi-line messages split)."""
    rec = _Lines()
    LOGGER.addHandler(rec)
    try:
        return fn(*args), rec.lines
    finally:
        LOGGER.removeHandler(rec)
