"""Weight files read one tensor at a time: safetensors and torch's zip checkpoints.

Opening a file reads only its index (the safetensors JSON header, or the zip's central directory
plus ``data.pkl`` through a restricted unpickler); each tensor's bytes are read when it is
loaded, with seek + readinto of exactly its byte range. Nothing is mmap'd: the touched pages of
an mmap'd file count in the process's RSS, so a 13 GB checkpoint would end up resident.
Every problem is a one-line ``LoadError`` naming the file.
"""

from __future__ import annotations

import codecs
import json
import math
import pickle
import zipfile
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from dsvl.errors import LoadError

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
SAFETENSORS_MAX_HEADER = 100_000_000  # the safetensors library's own limit
TORCH_STORAGES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool, "UntypedStorage": torch.uint8,
}
ZIP_LOCAL_HEADER = b"PK\x03\x04"
FIX = "re-copy or re-save it"


def _corrupt(path: Path, why: str) -> LoadError:
    return LoadError(f"{path} is corrupt or truncated ({why[:160]}); {FIX}")


@dataclass(frozen=True)
class LazyTensor:
    """A tensor in a file: its dtype, shape and strides, and where its elements lie.
    ``offset`` is the byte offset of element 0 of the span ``span`` elements long that holds
    every element (a strided view reads only the span it covers)."""

    path: Path
    offset: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    span: int

    @property
    def nbytes(self) -> int:
        return self.span * self.dtype.itemsize

    def load(self) -> torch.Tensor:
        """The tensor, read now (only its own bytes)."""
        flat = _read(self.path, self.offset, self.nbytes).view(self.dtype)
        return flat.as_strided(self.shape, self.stride)

    def rows(self, ids: Sequence[int]) -> torch.Tensor:
        """Rows ``ids`` of a 2-D tensor, reading only those rows when it is row-major."""
        if len(self.shape) != 2 or self.stride != (self.shape[1], 1):
            return self.load()[list(ids)]
        if any(not 0 <= i < self.shape[0] for i in ids):
            raise IndexError(f"rows {list(ids)} outside a tensor of {self.shape[0]} rows")
        row = self.shape[1] * self.dtype.itemsize
        out = [_read(self.path, self.offset + i * row, row).view(self.dtype) for i in ids]
        return torch.stack(out) if out else torch.empty(0, self.shape[1], dtype=self.dtype)


@dataclass(frozen=True)
class EagerTensor:
    """A tensor already in memory, behind LazyTensor's interface (legacy, non-zip checkpoints)."""

    tensor: torch.Tensor

    @property
    def dtype(self) -> torch.dtype:
        return self.tensor.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.tensor.shape)

    def load(self) -> torch.Tensor:
        return self.tensor

    def rows(self, ids: Sequence[int]) -> torch.Tensor:
        return self.tensor[list(ids)]


TensorSource = LazyTensor | EagerTensor


def _read(path: Path, offset: int, nbytes: int) -> torch.Tensor:
    """``nbytes`` bytes at ``offset`` into a fresh uint8 tensor (no mmap, no extra copy)."""
    buf = torch.empty(nbytes, dtype=torch.uint8)
    view = memoryview(buf.numpy())
    done = 0
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        while done < nbytes:
            got = f.readinto(view[done:])
            if not got:
                raise _corrupt(path, f"ends at byte {offset + done}, inside a tensor")
            done += got
    return buf


def contiguous_stride(shape: Sequence[int]) -> tuple[int, ...]:
    stride, step = [], 1
    for size in reversed(shape):
        stride.append(step)
        step *= max(size, 1)
    return tuple(reversed(stride))


def _span(shape: Sequence[int], stride: Sequence[int]) -> int:
    """Elements from the first to the last one a strided view touches (0 if it is empty)."""
    if any(size == 0 for size in shape):
        return 0
    return 1 + sum((size - 1) * step for size, step in zip(shape, stride, strict=True))


# ---------------------------------------------------------------- safetensors
def open_safetensors(path: Path) -> dict[str, LazyTensor]:
    """The tensors of a ``.safetensors`` file, from its header alone."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            text = f.read(length) if size >= 8 and length <= min(size - 8, SAFETENSORS_MAX_HEADER) else None
    except OSError as err:
        raise _corrupt(path, f"unreadable: {err}") from None
    if text is None:
        raise _corrupt(path, f"header length {length} does not fit a {size}-byte file")
    try:
        header = json.loads(text)
    except (UnicodeDecodeError, ValueError) as err:
        raise _corrupt(path, f"unreadable safetensors header: {err}") from None
    if not isinstance(header, dict):
        raise _corrupt(path, "the safetensors header is not a JSON object")
    base = 8 + length
    out = {}
    for name, info in header.items():
        if name != "__metadata__":
            out[name] = _safetensors_entry(path, name, info, base, size)
    return out


def _safetensors_entry(path: Path, name: str, info: object, base: int, size: int) -> LazyTensor:
    try:
        dtype_name, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
        shape = tuple(int(s) for s in shape)
        begin, end = int(begin), int(end)
    except (TypeError, KeyError, ValueError) as err:
        raise _corrupt(path, f"tensor {name}: bad header entry ({type(err).__name__})") from None
    dtype = SAFETENSORS_DTYPES.get(dtype_name)
    if dtype is None:
        raise LoadError(f"{path}: tensor {name} has dtype {dtype_name}, which this reader does not "
                        f"handle ({', '.join(SAFETENSORS_DTYPES)}); convert the file to float16/32")
    numel = math.prod(shape)
    if min(shape, default=0) < 0 or begin < 0 or end - begin != numel * dtype.itemsize:
        raise _corrupt(path, f"tensor {name}: byte range [{begin}, {end}) does not hold "
                             f"{dtype_name} {list(shape)}")
    if base + end > size:
        raise _corrupt(path, f"tensor {name} ends at byte {base + end}, past the file's {size}")
    return LazyTensor(path, base + begin, dtype, shape, contiguous_stride(shape), numel)


# ---------------------------------------------------------------- torch zip
@dataclass(frozen=True)
class _StorageType:
    dtype: torch.dtype


@dataclass(frozen=True)
class _Storage:
    key: str
    dtype: torch.dtype
    numel: int


class _TensorClass:
    """Stands for torch.Tensor / nn.Parameter in ``_rebuild_from_type_v2``."""


@dataclass(frozen=True)
class _TensorRef:
    storage: _Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None) -> _TensorRef:
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError("a tensor without a storage")
    return _TensorRef(storage, int(storage_offset), tuple(int(s) for s in size),
                      tuple(int(s) for s in stride))


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    return data


def _rebuild_from_type_v2(func, new_type, args, state):
    if new_type is not _TensorClass:
        raise pickle.UnpicklingError("a tensor subclass")
    return func(*args)


_ALLOWED = {  # a subset of torch.load(weights_only=True)'s allowed globals
    ("collections", "OrderedDict"): OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "bytearray"): bytearray,
    ("_codecs", "encode"): codecs.encode,
    ("torch", "Size"): tuple,
    ("torch", "Tensor"): _TensorClass,
    ("torch._tensor", "Tensor"): _TensorClass,
    ("torch.nn.parameter", "Parameter"): _TensorClass,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch.storage", "UntypedStorage"): _StorageType(torch.uint8),
} | {("torch", name): _StorageType(dtype) for name, dtype in TORCH_STORAGES.items()}


class _Refused(Exception):
    """A global the restricted unpickler does not allow."""


class _Unpickler(pickle.Unpickler):
    """Builds placeholders instead of tensors; finds only allow-listed globals."""

    def __init__(self, file):
        super().__init__(file)
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str):
        found = _ALLOWED.get((module, name))
        if found is None:
            raise _Refused(f"{module}.{name}")
        return found

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise pickle.UnpicklingError(f"unexpected persistent id {str(pid)[:40]}")
        _, kind, key, _location, numel = pid
        storage = self.storages.setdefault(str(key), _Storage(str(key), kind.dtype, int(numel)))
        if storage.dtype != kind.dtype:  # one storage viewed as two dtypes: not from torch.save
            raise pickle.UnpicklingError(f"storage {key} has two dtypes")
        return storage


def is_torch_zip(path: Path) -> bool:
    return zipfile.is_zipfile(path)


def open_torch_zip(path: Path) -> object:
    """What ``torch.load`` of a zip checkpoint returns, with each tensor a ``LazyTensor``."""
    try:
        with zipfile.ZipFile(path) as archive:
            entries = {info.filename: info for info in archive.infolist()}
            pkl = [name for name in entries if name.endswith("/data.pkl") and name.count("/") == 1]
            if len(pkl) != 1:
                raise _corrupt(path, "no single <archive>/data.pkl: not a torch.save checkpoint")
            prefix = pkl[0][:-len("data.pkl")]
            order = entries.get(prefix + "byteorder")
            if order is not None and archive.read(order).decode(errors="replace").strip() != "little":
                raise LoadError(f"{path} was saved on a big-endian machine; re-save it on a "
                                "little-endian one")
            with archive.open(pkl[0]) as f:
                unpickler = _Unpickler(f)
                obj = unpickler.load()
    except LoadError:
        raise
    except _Refused as err:
        raise LoadError(f"{path} pickles {err}, which a plain state dict of tensors never holds "
                        "(torch.load(weights_only=True) refuses it too); re-save the state dict "
                        "with torch.save(model.state_dict(), ...)") from None
    except (OSError, zipfile.BadZipFile) as err:
        raise _corrupt(path, str(err).strip().splitlines()[0] if str(err).strip() else "unreadable zip") from None
    except Exception as err:  # noqa: BLE001 - damaged pickle bytes surface as any error type
        raise _corrupt(path, f"{type(err).__name__} {err} while unpickling") from None
    offsets = _StorageOffsets(path, entries, prefix)
    return _resolve(obj, offsets)


class _StorageOffsets:
    """Where each storage's bytes start in the file: computed once per storage key from the zip
    entry's local header (torch stores its entries uncompressed, aligned to 64 bytes)."""

    def __init__(self, path: Path, entries: dict[str, zipfile.ZipInfo], prefix: str):
        self.path, self.entries, self.prefix = path, entries, prefix
        self.size = path.stat().st_size
        self.known: dict[str, int] = {}

    def start(self, storage: _Storage) -> int:
        if storage.key in self.known:
            return self.known[storage.key]
        info = self.entries.get(f"{self.prefix}data/{storage.key}")
        if info is None:
            raise _corrupt(self.path, f"storage {storage.key} has no data/{storage.key} entry")
        if info.compress_type != zipfile.ZIP_STORED:
            raise LoadError(f"{self.path}: entry {info.filename} is compressed; torch.save never "
                            "compresses: re-save it with torch.save")
        header = _read(self.path, info.header_offset, 30).numpy().tobytes()
        if header[:4] != ZIP_LOCAL_HEADER:
            raise _corrupt(self.path, f"entry {info.filename} has no local header")
        start = (info.header_offset + 30 + int.from_bytes(header[26:28], "little")
                 + int.from_bytes(header[28:30], "little"))
        need = storage.numel * storage.dtype.itemsize
        if info.file_size < need or start + need > self.size:
            raise _corrupt(self.path, f"entry {info.filename} holds {info.file_size} bytes of "
                                      f"{need} (file ends at {self.size})")
        self.known[storage.key] = start
        return start


def _resolve(obj: object, offsets: _StorageOffsets) -> object:
    """Replace the unpickler's tensor references by LazyTensors, checking each fits its storage."""
    if isinstance(obj, _TensorRef):
        storage, offset, shape, stride = obj.storage, obj.offset, obj.shape, obj.stride
        span = _span(shape, stride)
        if (offset < 0 or min(shape, default=0) < 0 or min(stride, default=0) < 0
                or len(shape) != len(stride) or offset + span > storage.numel):
            raise _corrupt(offsets.path, f"a tensor {list(shape)} at offset {offset} does not fit "
                                         f"storage {storage.key} of {storage.numel} elements")
        start = offsets.start(storage) + offset * storage.dtype.itemsize
        return LazyTensor(offsets.path, start, storage.dtype, shape, stride, span)
    if isinstance(obj, dict):
        return {key: _resolve(value, offsets) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_resolve(value, offsets) for value in obj)
    return obj
