"""Crash-safe publishing of an export: the old export stays whole until the new one is.

An export is assembled in a staging directory *beside* ``--out`` (``.OUT.partial-XXXX``): the
new files, hard links to the old files it does not replace, and the merged manifest. Then one
``renameat2(RENAME_EXCHANGE)`` swaps the two directories atomically, and the old one (now at
the staging path) is removed. A ``kill -9`` at any point leaves ``--out`` holding either the
old export or the new one, whole; what is left beside it is removed by the next export into
the same ``--out``. Where the kernel or file system cannot exchange, two renames are used and
the next export restores the old directory if it finds ``--out`` missing.

No torch, onnx or transformers here: ``--help`` stays fast.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import os
import shutil
import signal
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

from runtime.contract import FORMAT, FORMAT_VERSION, MANIFEST_NAME, STAMP_NAME
from runtime.durable import umask as current_umask
from runtime.durable import write_durable
from runtime.errors import DsvlEdgeError

CRASH_ENV = "DSVL_EDGE_CRASH_AT"  # tests: SIGKILL the publisher right after this step
STEPS = ("staged", "carried", "manifest", "swapped", "cleaned")


class PublishError(DsvlEdgeError, RuntimeError):
    """The export cannot be published in place; the message names the directory and the fix."""


def crash_point(step: str) -> None:
    """Test hook: die like ``kill -9`` right after ``step`` when $DSVL_EDGE_CRASH_AT names it."""
    if os.environ.get(CRASH_ENV) == step:
        os.kill(os.getpid(), signal.SIGKILL)


def stale_entries(out: Path) -> list[Path]:
    """Staging and old directories a killed export left beside (or, before 0.2, inside) ``out``."""
    found = sorted(out.parent.glob(f".{out.name}.partial-*")) + sorted(out.parent.glob(f".{out.name}.old-*"))
    if out.is_dir():
        found += sorted(out.glob(".partial-*"))
    return found


def clean_stale(out: Path) -> list[str]:
    """Remove what a killed export left beside ``out``. Returns one note per removal."""
    notes = []
    for path in stale_entries(out):
        shutil.rmtree(path, ignore_errors=True)
        notes.append(f"removed {path} (left by a killed export)")
    return notes


def restore_missing(out: Path) -> list[str]:
    """If ``out`` went missing between the two plain renames of a killed swap, put the old
    export (whole, in ``.OUT.old-*``) back."""
    olds = sorted(out.parent.glob(f".{out.name}.old-*"))
    if out.exists() or not olds:
        return []
    os.rename(olds[0], out)
    return [f"restored {out} from {olds[0].name} (an export was killed while swapping)"]


@contextlib.contextmanager
def _locked(out: Path) -> Iterator[None]:
    """One export at a time per ``--out``: an exclusive, non-blocking lock on the directory."""
    fd = os.open(out, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PublishError(f"another export into {out} is running; wait for it or choose "
                               "another --out") from None
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def staged(out: Path) -> Iterator[Path]:
    """A private staging directory beside ``out``; ``publish`` turns it into the new ``out``.
    On any failure it is removed, and ``out`` is untouched."""
    out = Path(os.path.realpath(out))  # swap the directory a symlink points at, not the link
    notes = restore_missing(out)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    with _locked(out), _remove_if_left_empty(out, created):
        for note in notes + clean_stale(out):
            print(f"      {note}", flush=True)
        try:
            stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
        except OSError as err:
            raise PublishError(f"--out {out}: cannot create a staging directory beside it in "
                               f"{out.parent} ({err.strerror}); the parent of --out must be "
                               "writable: choose a --out inside a writable directory") from None
        try:
            os.chmod(stage, stat.S_IMODE(out.stat().st_mode))  # mkdtemp's 0700 would be published
            yield stage
        finally:
            shutil.rmtree(stage, ignore_errors=True)


@contextlib.contextmanager
def _remove_if_left_empty(out: Path, created: bool) -> Iterator[None]:
    """A failed first export leaves no empty ``out`` behind."""
    try:
        yield
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                out.rmdir()
        raise


def _link_or_copy(src: str, dst: str) -> None:
    """Hard-link (exporters replace files by rename, never rewrite them in place), or copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def carry_old(out: Path, stage: Path, replaced: set[str]) -> list[str]:
    """Link every entry of the old ``out`` that the new export does not replace into ``stage``:
    other sections' files, engines, the user's own files. Hidden entries (stamps, staging) and
    the manifest are not carried."""
    carried = []
    for entry in sorted(out.iterdir()) if out.is_dir() else []:
        name = entry.name
        if name in replaced or name == MANIFEST_NAME or name.startswith("."):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, stage / name, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(str(entry), str(stage / name))
        carried.append(name)
    return carried


def merged_manifest(out: Path, sections: dict) -> dict:
    """The old manifest (when it is this format's) updated with ``sections``."""
    manifest: dict = {}
    with contextlib.suppress(OSError, ValueError):
        loaded = json.loads((out / MANIFEST_NAME).read_text())
        # a manifest without format_version has version 1's layout (runtime/manifest.py)
        if isinstance(loaded, dict) and loaded.get("format_version", 1) == FORMAT_VERSION:
            manifest = loaded
    manifest.update({"format": FORMAT, "format_version": FORMAT_VERSION, **sections})
    return manifest


def _fsync_tree(root: Path) -> None:
    """Flush the staged files and directories, so the swap never publishes unwritten data."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            with contextlib.suppress(OSError):
                fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        with contextlib.suppress(OSError):
            fd = os.open(dirpath, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2``); False where that is not available."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False  # kernel or file system without RENAME_EXCHANGE
    raise OSError(code, os.strerror(code), str(b))


def swap_in(stage: Path, out: Path) -> None:
    """Make the complete directory ``stage`` the new ``out``; the old ``out`` is removed."""
    out = Path(os.path.realpath(out))
    _fsync_tree(stage)
    try:
        if not out.exists():
            os.rename(stage, out)
            crash_point("swapped")
            return
        if exchange(stage, out):
            crash_point("swapped")
            shutil.rmtree(stage, ignore_errors=True)  # the old export now lives there
            return
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old)  # replaces the empty placeholder directory
        os.rename(stage, out)
        crash_point("swapped")
        shutil.rmtree(old, ignore_errors=True)
    except OSError as err:
        if err.errno in (errno.EBUSY, errno.EXDEV):
            raise PublishError(f"--out {out} cannot be replaced by a rename ({err.strerror}: a mount "
                               "point?); export into a subdirectory of it") from None
        raise


def publish(stage: Path, out: Path, names: list[str], sections: dict) -> dict:
    """Complete ``stage`` into the whole new export (the new ``names``, the old directory's
    other entries, the merged manifest) and swap it in. Returns the new manifest."""
    out = Path(os.path.realpath(out))
    umask = current_umask()
    for name in names:  # some writers create 0600 files
        if (stage / name).is_file():
            os.chmod(stage / name, 0o666 & ~umask)
    crash_point("staged")
    carry_old(out, stage, set(names) | {STAMP_NAME})
    crash_point("carried")
    manifest = merged_manifest(out, sections)
    write_durable(stage / MANIFEST_NAME, json.dumps(manifest, indent=2, sort_keys=True).encode())
    crash_point("manifest")
    swap_in(stage, out)
    crash_point("cleaned")
    return manifest
