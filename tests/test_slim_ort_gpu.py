"""scripts/slim_ort_gpu.py on a made-up ELF library: the fatbin entries of other architectures
are zeroed, the kept one and every header stay as they were."""

from __future__ import annotations

import struct
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from scripts.slim_ort_gpu import FATBIN_MAGIC, keep_arch, section  # noqa: E402


def entry(arch: int, payload: bytes) -> bytes:
    """A fatbin entry: kind, version, header size (64), payload size, arch at byte 28."""
    header = bytearray(64)
    struct.pack_into("<HHIQ", header, 0, 2, 0x101, 64, len(payload))
    struct.pack_into("<I", header, 28, arch)
    return bytes(header) + payload


def elf_with(fatbin: bytes) -> bytearray:
    """An ELF64 file of three sections: null, .nv_fatbin and the section-name table."""
    names = b"\0.nv_fatbin\0.shstrtab\0"
    data_at = 64
    names_at = data_at + len(fatbin)
    headers_at = (names_at + len(names) + 7) // 8 * 8
    out = bytearray(headers_at + 3 * 64)
    out[:4] = b"\x7fELF"
    struct.pack_into("<Q", out, 0x28, headers_at)
    struct.pack_into("<HHH", out, 0x3A, 64, 3, 2)
    out[data_at:names_at] = fatbin
    out[names_at:names_at + len(names)] = names
    for index, (name, offset, size) in enumerate([(0, 0, 0), (1, data_at, len(fatbin)),
                                                  (12, names_at, len(names))]):
        struct.pack_into("<I", out, headers_at + index * 64, name)
        struct.pack_into("<QQ", out, headers_at + index * 64 + 0x18, offset, size)
    return out


def test_only_the_kept_architecture_keeps_its_kernels():
    entries = entry(80, b"A" * 24) + entry(90, b"B" * 16) + entry(120, b"C" * 8)
    fatbin = struct.pack("<IHHQ", FATBIN_MAGIC, 1, 16, len(entries)) + entries
    library = elf_with(fatbin)
    start, size = section(library, ".nv_fatbin")
    assert (start, size) == (64, len(fatbin))
    before = bytes(library)
    assert keep_arch(library, 90) == (32, 1)
    body = bytes(library[start + 16:start + size])
    assert body == entry(80, bytes(24)) + entry(90, b"B" * 16) + entry(120, bytes(8))
    assert library[:start + 16] == before[:start + 16] and library[start + size:] == before[start + size:]


def test_a_library_without_kernels_is_left_alone():
    library = elf_with(b"")
    assert keep_arch(library, 90) == (0, 0)
