"""An onnxruntime-gpu wheel cut down to one GPU architecture, as a .tar.xz of the package, for
a GPU machine that reaches no package index and takes files in small loads (the 244 MiB
wheel becomes ~58 MiB for an H100/H200).

    python scripts/slim_ort_gpu.py WHEEL --arch 90 --out ort-sm90.tar.xz
    # there: mkdir -p /tmp/og && tar xJf ort-sm90.tar.xz -C /tmp/og && export PYTHONPATH=/tmp/og

What it drops: the CUDA provider's kernels for every other architecture (their bytes zeroed in
the library's ``.nv_fatbin`` section, headers kept, so the CUDA runtime still parses it and
picks the kept ones), the TensorRT provider and the C API library (``libonnxruntime.so``,
which the Python module does not load). A measurement aid: never ship the result.
"""

from __future__ import annotations

import argparse
import io
import lzma
import struct
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

FATBIN_MAGIC = 0xBA55ED50
DROPPED = ("libonnxruntime_providers_tensorrt.so", "libonnxruntime.so")


def section(data: bytes | bytearray, wanted: str) -> tuple[int, int] | None:
    """(file offset, size) of an ELF64 little-endian section by name."""
    shoff, = struct.unpack_from("<Q", data, 0x28)
    entsize, count, names = struct.unpack_from("<HHH", data, 0x3A)
    name_offset = struct.unpack_from("<Q", data, shoff + names * entsize + 0x18)[0]
    for i in range(count):
        header = shoff + i * entsize
        name = struct.unpack_from("<I", data, header)[0]
        end = data.index(b"\0", name_offset + name)
        if data[name_offset + name:end].decode() == wanted:
            return struct.unpack_from("<Q", data, header + 0x18)[0], struct.unpack_from("<Q", data, header + 0x20)[0]
    return None


def keep_arch(data: bytearray, arch: int) -> tuple[int, int]:
    """Zero every fatbin entry's payload not built for ``arch``: (bytes zeroed, entries kept)."""
    found = section(data, ".nv_fatbin")
    if found is None:
        return 0, 0
    pos, end = found[0], found[0] + found[1]
    zeroed = kept = 0
    while pos + 16 <= end:
        magic, _, header_size, fat_size = struct.unpack_from("<IHHQ", data, pos)
        if magic != FATBIN_MAGIC:
            pos += 8  # fatbins are 8-byte aligned
            continue
        entry, last = pos + header_size, pos + header_size + fat_size
        while entry < last:
            _, _, entry_header, payload = struct.unpack_from("<HHIQ", data, entry)
            entry_arch = struct.unpack_from("<I", data, entry + 28)[0]
            if entry_arch == arch:
                kept += 1
            else:
                data[entry + entry_header:entry + entry_header + payload] = bytes(payload)
                zeroed += payload
            entry += entry_header + payload
        pos = last
    return zeroed, kept


def slim(wheel: Path, arch: int, out: Path) -> dict:
    with tempfile.TemporaryDirectory() as work, zipfile.ZipFile(wheel) as archive:
        archive.extractall(work)
        root = Path(work)
        report = {"zeroed_mb": 0.0, "kept_entries": 0, "dropped": []}
        for library in sorted(root.glob("onnxruntime/capi/*.so*")):
            if library.name.startswith(DROPPED):
                report["dropped"].append(library.name)
                library.unlink()
                continue
            data = bytearray(library.read_bytes())
            zeroed, kept = keep_arch(data, arch)
            if zeroed:
                library.write_bytes(data)
                report["zeroed_mb"] += zeroed / 2**20
                report["kept_entries"] += kept
        if not report["kept_entries"]:
            raise SystemExit(f"error: no CUDA kernels for sm_{arch} in {wheel.name}: pick an --arch it has")
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            for path in sorted(root.iterdir()):
                tar.add(path, arcname=path.name)
        out.write_bytes(lzma.compress(buffer.getvalue(), preset=9))
    report["out_mb"] = out.stat().st_size / 2**20
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python scripts/slim_ort_gpu.py", description=__doc__.split("\n\n")[0])
    p.add_argument("wheel", type=Path, help="an onnxruntime-gpu wheel (pip download onnxruntime-gpu==...)")
    p.add_argument("--arch", type=int, default=90, help="the SM architecture to keep (default 90: H100, H200)")
    p.add_argument("--out", type=Path, required=True, help="the .tar.xz to write")
    args = p.parse_args(argv)
    if not args.wheel.is_file():
        p.error(f"{args.wheel}: no such wheel")
    report = slim(args.wheel, args.arch, args.out)
    print(f"wrote {args.out} ({report['out_mb']:.1f} MiB): {report['kept_entries']} sm_{args.arch} "
          f"kernel images kept, {report['zeroed_mb']:.0f} MiB of other architectures zeroed, "
          f"dropped {', '.join(report['dropped']) or 'nothing'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
