"""Back a session's weights with 2 MiB pages (Linux), so a decode step's weight stream misses
the TLB 512 times less often.

A CPU decode step reads every weight once: tens of MiB for a small model, GiBs for a 7B one,
through 4 KiB pages unless the memory is marked for transparent huge pages. Debian and Ubuntu,
among others, ship THP in ``madvise`` mode, and neither ONNX Runtime nor glibc's malloc asks for
it, so the weights ONNX Runtime prepacks land on 4 KiB pages. Measured on the ``small`` preset's decoders
(2-core EPYC): 1.12x (int4) and 1.16x (fp32) faster steps once that memory sits on huge pages
(docs/benchmarks.md, "Huge pages, the fed-back token and the head's output").

After a session is created, this asks the kernel (``madvise``: ``MADV_HUGEPAGE``, then
``MADV_COLLAPSE``, Linux 6.1+) to move the anonymous memory that appeared during the creation
onto huge pages: the mappings that are new or grew during the creation, at least 90% resident,
so nothing sparse (a KV cache allocated but unwritten) is filled in and the resident size does
not grow. ``DSVL_EDGE_HUGE_PAGES=0`` in the environment turns it off for the whole process (the
test suite does, where many sessions load into one large process). Best effort:
an older kernel, THP off or another OS leaves the memory as it was, and the report says why.
"""

from __future__ import annotations

import ctypes
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from errno import EINVAL

HUGE_PAGE = 2 << 20  # x86-64's and arm64's (4 KiB base pages) PMD size
MADV_HUGEPAGE, MADV_COLLAPSE = 14, 25  # asm-generic/mman-common.h: the same on x86-64 and arm64
MIN_RESIDENT = 0.9  # of a mapping, for it to be collapsed
OFF_SWITCH = "DSVL_EDGE_HUGE_PAGES"  # "0": never collapse, whatever the callers ask
Regions = dict[tuple[int, int], int]  # (start, end) of a private anonymous mapping -> resident bytes


@dataclass
class HugePageReport:
    """What backing a session's memory with huge pages did (kept on the runner)."""

    requested: bool = False
    collapsed_bytes: int = 0  # memory now asked onto huge pages
    seconds: float = 0.0
    skipped: str | None = None  # why nothing was tried, or the kernel's error


def anonymous_regions(smaps: str = "/proc/self/smaps") -> Regions:
    """The process's private writable anonymous mappings (the heap included) and how much of
    each is resident."""
    regions: Regions = {}
    current = None
    with open(smaps) as lines:
        for line in lines:
            head = line.split(maxsplit=6)
            if "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
                start, end = (int(x, 16) for x in head[0].split("-"))
                path = head[5].strip() if len(head) > 5 else ""
                private_rw = head[1].startswith("rw") and head[1].endswith("p")
                current = (start, end) if private_rw and path in ("", "[heap]") else None
            elif current is not None and head[0] == "Rss:":
                regions[current] = int(head[1]) * 1024
                current = None
    return regions


def grown_regions(before: Regions, after: Regions) -> list[tuple[int, int]]:
    """Each mapping that is new or more resident than ``before`` and at least ``MIN_RESIDENT``
    resident, cut to whole huge pages. Whole mappings, not only their newly mapped ranges:
    ONNX Runtime also puts weights in heap memory it freed while loading, and taking only the
    new ranges left up to half of a small int4 decoder's weights on 4 KiB pages."""
    spans = []
    for (start, end), resident in sorted(after.items()):
        if before.get((start, end), -1) >= resident or resident < MIN_RESIDENT * (end - start):
            continue
        first, last = -(-start // HUGE_PAGE) * HUGE_PAGE, end // HUGE_PAGE * HUGE_PAGE
        if last - first >= HUGE_PAGE:
            spans.append((first, last))
    return spans


def unavailable() -> str | None:
    """Why huge pages cannot be asked for here, or None."""
    if not sys.platform.startswith("linux"):
        return f"not Linux ({sys.platform})"
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as mode:
            if "[never]" in mode.read():
                return "transparent huge pages are off (/sys/kernel/mm/transparent_hugepage/enabled: never)"
    except OSError:
        return "this kernel has no transparent huge pages"
    return None


def kernel_version(release: str | None = None) -> tuple[int, int]:
    """(major, minor) of the running kernel ("5.15.148-tegra" -> (5, 15)); (0, 0) if unreadable."""
    try:
        major, minor = (release or os.uname().release).split(".")[:2]
        return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)
    except (ValueError, AttributeError):
        return 0, 0


def madvise_error(advice: int, error_number: int, kernel: tuple[int, int] | None = None) -> str:
    """The report's words for a refused madvise: MADV_COLLAPSE's EINVAL on a kernel older
    than 6.1 (JetPack 6's 5.15, for one) says what still happens."""
    kernel = kernel or kernel_version()
    if advice == MADV_COLLAPSE and error_number == EINVAL and (0, 0) < kernel < (6, 1):
        return (f"MADV_COLLAPSE needs Linux 6.1+ (this kernel is {kernel[0]}.{kernel[1]}): the memory "
                "is marked for huge pages, and the kernel's khugepaged moves it in the background")
    return f"madvise {advice}: {os.strerror(error_number)}"


def collapse(spans: list[tuple[int, int]]) -> tuple[int, str | None]:
    """madvise each span onto huge pages; returns the bytes asked for and the first error."""
    libc = ctypes.CDLL(None, use_errno=True)
    madvise = libc.madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    done, error = 0, None
    for low, high in spans:
        for advice in (MADV_HUGEPAGE, MADV_COLLAPSE):
            if madvise(low, high - low, advice) != 0:
                error = error or madvise_error(advice, ctypes.get_errno())
                break
        else:
            done += high - low
    return done, error


@contextmanager
def on_huge_pages(enabled: bool = True) -> Iterator[HugePageReport]:
    """Collapse onto huge pages the anonymous memory allocated inside the ``with`` block (a
    session's creation: its prepacked weights)."""
    report = HugePageReport(requested=enabled)
    reason = None if enabled else "turned off"
    if enabled and os.environ.get(OFF_SWITCH) == "0":
        reason = f"turned off ({OFF_SWITCH}=0)"
    reason = reason or unavailable()
    before = {} if reason else anonymous_regions()
    yield report
    if reason:
        report.skipped = reason
        return
    start = time.perf_counter()
    report.collapsed_bytes, report.skipped = collapse(grown_regions(before, anonymous_regions()))
    report.seconds = time.perf_counter() - start
