"""Are the artefact files the ones the manifest describes? Fast by default, full on request,
and remembered: a verified stamp keeps later loads fast.

* Default load: each file's size, plus a fingerprint (sha256 of its size and 1 MiB at the start,
  middle and end; the whole file when small). Catches truncation and files from another export;
  cannot catch a changed byte outside the sampled regions.
* ``verify_hash``: the full sha256 of every file (about 1 GB/s per core).
* Stamp: after a file's full sha256 matched, its size, mtime_ns and inode are recorded in
  ``.manifest.verified.json`` beside the manifest (written atomically, tied to the manifest's
  own hash). A file whose stat still matches its stamp counts as fully verified, on every load;
  a file whose stat changed since is fully hashed again, even without ``verify_hash``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from runtime.contract import MANIFEST_NAME, STAMP_NAME
from runtime.errors import ArtifactError
from runtime.hashing import fingerprint_file, sha256_file
from runtime.manifest import FileEntry


def _stat_key(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino}


def _manifest_digest(root: Path) -> str:
    return hashlib.sha256((root / MANIFEST_NAME).read_bytes()).hexdigest()


def read_stamp(root: Path, manifest_digest: str) -> dict[str, dict[str, Any]]:
    """The stamped files, or {} when there is no stamp or it belongs to another manifest."""
    try:
        stamp = json.loads((root / STAMP_NAME).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(stamp, dict) or stamp.get("manifest_sha256") != manifest_digest:
        return {}
    files = stamp.get("files")
    return files if isinstance(files, dict) else {}


def write_stamp(root: Path, manifest_digest: str, files: dict[str, dict[str, Any]]) -> bool:
    """Write the stamp atomically; False (and no error) on a read-only directory."""
    tmp = root / f"{STAMP_NAME}.tmp-{os.getpid()}"
    try:
        tmp.write_text(json.dumps({"manifest_sha256": manifest_digest, "files": files}, indent=1))
        os.replace(tmp, root / STAMP_NAME)
        return True
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()
        return False


def _mismatch(path: Path, how: str, remedy: str) -> ArtifactError:
    return ArtifactError(f"{path} does not match manifest.json ({how}: it comes from a different "
                         f"export or was changed); {remedy}")


def check_files(root: Path, entries: list[FileEntry], verify_hash: bool = False,
                remedy: str | None = None) -> int:
    """Check ``entries`` under ``root``; returns how many files were fully hashed. Raises
    ArtifactError naming the first file that does not match, and ``remedy`` (what to re-run).
    The stamp keeps what earlier calls verified for other files."""
    remedy = remedy or f"re-run `python -m export.all --out {root}`"
    digest = _manifest_digest(root)
    stamped = read_stamp(root, digest)
    fresh: dict[str, dict[str, Any]] = {}
    hashed = 0
    for entry in entries:
        path = root / entry.path
        if not path.is_file():
            raise ArtifactError(f"{path} is missing: {remedy}")
        if path.stat().st_size != entry.bytes:
            raise _mismatch(path, f"{path.stat().st_size} bytes, the manifest says {entry.bytes}", remedy)
        stat = _stat_key(path)
        mark = stamped.get(entry.path)
        if mark == {**stat, "sha256": entry.sha256}:
            fresh[entry.path] = mark  # fully verified before and unchanged since
            continue
        if verify_hash or mark is not None:  # asked for, or changed since it was verified
            hashed += 1
            if sha256_file(path) != entry.sha256:
                raise _mismatch(path, "sha256 differs", remedy)
            fresh[entry.path] = {**stat, "sha256": entry.sha256}
        elif entry.fingerprint is not None and fingerprint_file(path) != entry.fingerprint:
            raise _mismatch(path, "fingerprint differs", remedy)
    if hashed and {**stamped, **fresh} != stamped:
        write_stamp(root, digest, {**stamped, **fresh})
    return hashed
