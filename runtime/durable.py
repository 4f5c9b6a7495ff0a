"""Whole-file writes: a reader sees the old file or the new one, never half of one. Here, not
in export/, because the runtime writes files too (``python -m runtime.evaluate``'s CSV) and
never imports the exporters."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def umask() -> int:
    """The process's file-creation mask (read by setting it and putting it back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_durable(path: Path, data: bytes | memoryview) -> None:
    """Write, fsync, then rename into place: never a half file under ``path``. A failed
    write raises its own error; the temporary file's cleanup never hides it."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
