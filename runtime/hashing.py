"""File identities the manifest records: the full sha256, and a cheap fingerprint for loads."""

from __future__ import annotations

import hashlib
from pathlib import Path

FINGERPRINT_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fingerprint_file(path: Path) -> str:
    """A cheap identity for large files: sha256 of the size and 1 MiB at the start, middle and
    end (the whole file when small). Checked on every load; full sha256 only on request."""
    size = Path(path).stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as fh:
        if size <= 3 * FINGERPRINT_CHUNK:
            digest.update(fh.read())
        else:
            for offset in (0, size // 2, size - FINGERPRINT_CHUNK):
                fh.seek(offset)
                digest.update(fh.read(FINGERPRINT_CHUNK))
    return digest.hexdigest()
