"""Write a DSVL-format ``pytorch_model.bin`` one tensor at a time (for benchmarks and tests).

``torch.save`` needs the whole state dict in memory; a 7B checkpoint written that way costs
13.5 GB of RAM. This writes torch's zip layout directly: each tensor's bytes as a stored,
64-byte-aligned ``<archive>/data/<i>`` entry as soon as it arrives, and ``data.pkl`` (which
only names storages, shapes and dtypes) at the end. ``torch.load(weights_only=True)`` and
``dsvl.lazy_files`` both read the result.
"""

from __future__ import annotations

import io
import pickle
import struct
import zipfile
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch._utils

from dsvl.lazy_files import TORCH_STORAGES, contiguous_stride

ALIGNMENT = 64  # torch's kFieldAlignment: data starts on a 64-byte boundary
PAD_FIELD = 0x4246  # the extra-field id ("FB") torch pads local headers with
ZIP64_EXTRA = 20  # what zipfile appends to a zip64 local header's extra field
STORAGE_NAMES = {dtype: name for name, dtype in TORCH_STORAGES.items() if name != "UntypedStorage"}


@dataclass(frozen=True)
class _StorageRef:
    dtype: torch.dtype
    key: str
    numel: int


@dataclass(frozen=True)
class _TensorRef:
    storage: _StorageRef
    shape: tuple[int, ...]

    def __reduce__(self):
        return (torch._utils._rebuild_tensor_v2,
                (self.storage, 0, self.shape, contiguous_stride(self.shape), False, OrderedDict()))


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _StorageRef):
            return ("storage", getattr(torch, STORAGE_NAMES[obj.dtype]), obj.key, "cpu", obj.numel)
        return None


def _write_entry(archive: zipfile.ZipFile, name: str, data: memoryview | bytes, zip64: bool) -> None:
    """One stored entry whose data starts on a 64-byte boundary (padding in the extra field)."""
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    info.file_size = len(data)
    zip64 = zip64 or info.file_size * 1.05 > zipfile.ZIP64_LIMIT  # zipfile's own rule
    header_end = archive.fp.tell() + 30 + len(name.encode()) + 4 + (ZIP64_EXTRA if zip64 else 0)
    pad = -header_end % ALIGNMENT
    info.extra = struct.pack("<HH", PAD_FIELD, pad) + b"Z" * pad
    with archive.open(info, "w", force_zip64=zip64) as f:
        f.write(data)


def write_dsvl_checkpoint(path: Path, named_tensors: Iterable[tuple[str, torch.Tensor]],
                          force_zip64: bool = False) -> int:
    """Write ``named_tensors`` (consumed one at a time) as a torch.save-compatible state dict.
    Returns how many tensors were written. ``force_zip64`` writes zip64 headers even for small
    entries (tests use it; large entries get them anyway)."""
    path = Path(path)
    prefix = (path.stem or "archive") + "/"
    state: OrderedDict[str, _TensorRef] = OrderedDict()
    with open(path, "wb") as raw, zipfile.ZipFile(raw, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name, data in ((".format_version", b"1"), (".storage_alignment", str(ALIGNMENT).encode()),
                           ("byteorder", b"little")):
            _write_entry(archive, prefix + name, data, force_zip64)
        for name, tensor in named_tensors:
            if name in state:
                raise ValueError(f"tensor {name} given twice")
            if tensor.dtype not in STORAGE_NAMES:
                raise ValueError(f"tensor {name}: dtype {tensor.dtype} has no torch storage type here")
            flat = tensor.detach().to("cpu").contiguous().reshape(-1)
            key = str(len(state))
            _write_entry(archive, f"{prefix}data/{key}", memoryview(flat.view(torch.uint8).numpy()),
                         force_zip64)
            state[name] = _TensorRef(_StorageRef(tensor.dtype, key, flat.numel()), tuple(tensor.shape))
            del flat
        buffer = io.BytesIO()
        _Pickler(buffer, protocol=2).dump(state)
        _write_entry(archive, prefix + "data.pkl", buffer.getvalue(), force_zip64)
        _write_entry(archive, prefix + "version", b"3\n", force_zip64)
    return len(state)
