"""runtime/hugepages.py: which memory is moved onto 2 MiB pages after a session's creation (new
or grown anonymous mappings, at least 90% resident, aligned to 2 MiB), what the report says
where nothing can be done, and the runner's switch."""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from runtime import hugepages as hp
from runtime.artifacts import open_artifacts
from runtime.backends.ort import OrtDecoderRunner

MIB = 1 << 20

SMAPS = """\
55d0c0000000-55d0c3400000 rw-p 00000000 00:00 0                          [heap]
Size:              53248 kB
Rss:               53248 kB
VmFlags: rd wr mr mw me ac
7f0000000000-7f0001000000 rw-p 00000000 00:00 0
Size:              16384 kB
Rss:                1024 kB
7f0001000000-7f0002000000 r--p 00000000 fe:00 1234                       /usr/lib/libfoo.so
Size:              16384 kB
Rss:               16384 kB
7f0002000000-7f0002f00000 rw-p 00000000 00:00 0
Size:              15360 kB
Rss:               15360 kB
7f0003000000-7f0003100000 rw-s 00000000 00:01 99                         /dev/shm/x
Size:               1024 kB
Rss:                1024 kB
"""


def test_smaps_give_the_private_anonymous_mappings_and_their_residence(tmp_path):
    path = tmp_path / "smaps"
    path.write_text(SMAPS)
    assert hp.anonymous_regions(str(path)) == {
        (0x55D0C0000000, 0x55D0C3400000): 52 * MIB,  # the heap
        (0x7F0000000000, 0x7F0001000000): 1 * MIB,  # sparse: a cache allocated, unwritten
        (0x7F0002000000, 0x7F0002F00000): 15 * MIB,
    }  # not the library's file mapping, not the shared one


def test_new_or_grown_mostly_resident_memory_is_collapsed():
    heap, sparse, weights, small = (0x1000000, 0x4400000), (0x8000000, 0x9000000), \
        (0xA000000 + 4096, 0xA800000), (0xC000000, 0xC200000 - 4096)
    unchanged = (0x60000000, 0x60400000)
    before = {(0x1000000, 0x2000000): 16 * MIB, sparse: 1 * MIB, unchanged: 4 * MIB}
    after = {heap: 52 * MIB, sparse: 16 * MIB * 89 // 100, weights: weights[1] - weights[0],
             small: small[1] - small[0], unchanged: 4 * MIB}
    # The heap grew: whole (weights also land in memory freed while loading). The once-sparse
    # mapping is still under 90% resident; the new weights' mapping is rounded in to 2 MiB
    # boundaries; a mapping that holds no whole 2 MiB page, or did not change, is left alone.
    assert hp.grown_regions(before, after) == [heap, (0xA200000, 0xA800000)]
    assert hp.grown_regions(after, after) == []


def test_turned_off_or_not_linux_touches_nothing(monkeypatch):
    with hp.on_huge_pages(False) as report:
        pass
    assert report == hp.HugePageReport(requested=False, skipped="turned off")
    monkeypatch.setenv(hp.OFF_SWITCH, "0")
    with hp.on_huge_pages() as report:
        pass
    assert report.collapsed_bytes == 0 and report.skipped == f"turned off ({hp.OFF_SWITCH}=0)"
    monkeypatch.delenv(hp.OFF_SWITCH)
    monkeypatch.setattr(sys, "platform", "darwin")
    with hp.on_huge_pages() as report:
        pass
    assert report.requested and report.collapsed_bytes == 0 and report.skipped == "not Linux (darwin)"


@pytest.fixture(autouse=True)
def switched_on(monkeypatch):
    """The suite turns huge pages off for its own process (tests/conftest.py); here they are
    what is tested."""
    monkeypatch.delenv(hp.OFF_SWITCH, raising=False)


def test_new_memory_is_asked_onto_huge_pages_or_the_report_says_why():
    """What the kernel grants depends on the machine (THP mode, Linux 6.1+ for MADV_COLLAPSE, free
    huge pages): either the new buffer's pages were asked for, or the reason is reported."""
    with hp.on_huge_pages() as report:
        buffer = np.ones(32 * MIB, np.uint8)  # resident: every page written
    reason = hp.unavailable()
    if reason:
        assert report.skipped == reason and report.collapsed_bytes == 0
    elif report.skipped is None:
        assert report.collapsed_bytes >= 16 * MIB and report.seconds >= 0
    else:
        assert report.skipped.startswith(("madvise ", "MADV_COLLAPSE needs Linux 6.1+"))
    assert int(buffer.sum()) == 32 * MIB  # the memory is unchanged either way


def test_an_older_kernel_is_named_with_what_still_happens():
    """JetPack 6's 5.15 has no MADV_COLLAPSE (EINVAL): the report says the memory stays marked
    for khugepaged, not a bare errno; other refusals keep the errno's words."""
    assert hp.kernel_version("5.15.148-tegra") == (5, 15)
    assert hp.kernel_version("6.18.0") == (6, 18)
    assert hp.kernel_version("weird") == (0, 0)
    old = hp.madvise_error(hp.MADV_COLLAPSE, errno.EINVAL, (5, 15))
    assert old.startswith("MADV_COLLAPSE needs Linux 6.1+ (this kernel is 5.15)") and "khugepaged" in old
    assert hp.madvise_error(hp.MADV_COLLAPSE, errno.EINVAL, (6, 6)) == f"madvise 25: {os.strerror(errno.EINVAL)}"
    assert hp.madvise_error(hp.MADV_HUGEPAGE, errno.EPERM, (5, 15)) == f"madvise 14: {os.strerror(errno.EPERM)}"


def test_the_decoder_runner_reports_what_it_did(exported):
    art: Path = exported("--vis-proj", "perceiver")
    decoder = open_artifacts(art).decoder
    on = OrtDecoderRunner(art / decoder.file.path, decoder, threads=1)
    off = OrtDecoderRunner(art / decoder.file.path, decoder, threads=1, huge_pages=False)
    assert on.huge_pages.requested and off.huge_pages.skipped == "turned off"
    rng = np.random.default_rng(0)
    embeds = rng.standard_normal((1, 4, decoder.hidden_size)).astype(np.float32)
    logits = [runner.forward(embeds, np.ones((1, 4), np.int64), np.arange(4)[None]).copy()
              for runner in (on, off)]
    np.testing.assert_array_equal(*logits)
    on.close()
    off.close()


@pytest.mark.parametrize("argv", [[], ["--no-huge-pages"]])
def test_the_clis_switch(argv):
    import argparse

    from runtime.cli import add_common_flags
    from runtime.serve.__main__ import parse_args

    parser = argparse.ArgumentParser()
    add_common_flags(parser)
    assert parser.parse_args(argv).huge_pages == (not argv)
    assert parse_args(["--artifacts", "x", *argv]).huge_pages == (not argv)
