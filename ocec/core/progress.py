"""Progress bars, quiet mode and metric formatting: used by every layer (decoding, training, tools),
so they live below all of them."""

from __future__ import annotations

import logging
import sys
from contextlib import contextmanager

from tqdm import tqdm

log = logging.getLogger("ocec")

_quiet = False  # set by quiet(): a torchrun process other than the main one


def progress(iterable=None, **kwargs) -> tqdm:
    """A tqdm bar on stderr for every step that takes more than a moment; quiet when stderr is not a
    terminal (log files, nohup, CI)."""
    return tqdm(iterable, file=sys.stderr, disable=_quiet or not sys.stderr.isatty(), leave=False, **kwargs)


@contextmanager
def quiet(enabled: bool):
    """No progress bars and only errors in the log for the block: under torchrun the main process reports
    for all, and N copies of each line would bury it."""
    global _quiet
    if not enabled:
        yield
        return
    level, _quiet = log.level, True
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)
        _quiet = False


def fmt(value, digits: int = 4) -> str:
    """A metric for a log line; undefined (None, NaN) as n/a."""
    return "n/a" if value is None or value != value else f"{value:.{digits}f}"
