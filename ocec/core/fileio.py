"""Atomic file writing: a reader (or a resumed run) never sees a half-written file.

Every file goes to a temporary name in the same folder, is flushed and fsync'ed, then renamed
over the target (rename is atomic on POSIX within one filesystem). On any failure (a full
disk, a kill) the temporary file is removed or left under a `.tmp-` name that nothing reads,
and the previous version of the target stays intact.
"""

from __future__ import annotations

import errno
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Callable

from .errors import UserError

TMP_PREFIX = ".tmp-"


def atomic_write(path: str | Path, write: Callable[[object], None]) -> Path:
    """Call `write(binary_file)` on a temporary file, then rename it to `path` (mode 0666 & ~umask)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX + path.name + ".", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes it 0600; end as open() would (runs are shared)
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError):
            why = (
                "the disk is full"
                if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
                else exc.strerror or str(exc)
            )
            raise UserError(f"could not write {path}: {why}; the previous version of the file is untouched") from exc
        raise
    return path


def current_umask() -> int:
    """The process's umask (POSIX has no call that only reads it: set it and put it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_text_atomic(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def write_json_atomic(path: str | Path, data) -> Path:
    return write_text_atomic(path, json.dumps(to_jsonable(data), indent=2) + "\n")


def to_jsonable(value):
    """NaN/inf -> None (JSON has no NaN), tuples -> lists, numpy/torch scalars -> Python numbers."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def remove_stale_temporaries(folder: str | Path) -> None:
    """Delete temporary files a killed process left behind."""
    for stale in Path(folder).glob(TMP_PREFIX + "*"):
        try:
            stale.unlink()
        except OSError:
            pass
