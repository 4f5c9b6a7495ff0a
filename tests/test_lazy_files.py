"""The lazy readers against the libraries that wrote the files: every tensor equals what
torch.load / safetensors' load_file give, dtypes, strided views and shared storages included;
damaged files are one-line LoadErrors naming the file."""

from __future__ import annotations

import json
import os
import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dsvl.errors import LoadError
from dsvl.lazy_files import open_safetensors, open_torch_zip
from dsvl.lazy_sources import open_checkpoint, open_hf_weights
from dsvl.loading import read_checkpoint


def tensors(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(6, 8, generator=gen)
    return {
        "f32": torch.randn(5, 7, generator=gen),
        "f16": torch.randn(4, 3, generator=gen).half(),
        "bf16": torch.randn(9, generator=gen).bfloat16(),
        "i64": torch.arange(11),
        "scalar": torch.tensor(2.5),
        "empty": torch.empty(0, 4),
        "base": base,
        "transposed": base.t(),  # shares base's storage, strided
        "window": base[1:4, 2:7],  # a view at a storage offset
        "row": base[5],
    }


def assert_same(got: torch.Tensor, want: torch.Tensor, name: str) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape, name
    assert torch.equal(got, want), name


def one_line(err: pytest.ExceptionInfo, *needles: str) -> None:
    text = str(err.value)
    assert "\n" not in text and "Traceback" not in text, text
    for needle in needles:
        assert needle in text, text


def test_torch_zip_equals_torch_load(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    torch.save(OrderedDict(tensors(1)), path)
    want = torch.load(path, weights_only=True)
    got = open_torch_zip(path)
    assert list(got) == list(want)
    for name, tensor in want.items():
        lazy = got[name]
        assert tuple(lazy.shape) == tuple(tensor.shape) and lazy.dtype == tensor.dtype
        loaded = lazy.load()
        assert_same(loaded, tensor, name)
        assert loaded.stride() == tensor.stride(), name
    assert got["window"].nbytes < got["base"].nbytes  # a view reads only the span it covers


def test_checkpoint_unwraps_deepspeed_and_canonicalises(tmp_path):
    state = {"vis_encoder.vision_model.embeddings.x": torch.ones(2), "projection.0.weight": torch.zeros(3, 2)}
    torch.save({"module": state}, tmp_path / "pytorch_model.bin")
    got = open_checkpoint(tmp_path)
    assert sorted(got) == ["projection.0.weight", "vis_encoder.embeddings.x"]
    assert torch.equal(read_checkpoint(tmp_path)["vis_encoder.embeddings.x"], torch.ones(2))


def test_legacy_non_zip_checkpoint_still_loads(tmp_path):
    path = tmp_path / "old.bin"
    torch.save({"a": torch.arange(4.0)}, path, _use_new_zipfile_serialization=False)
    assert torch.equal(open_checkpoint(path)["a"].load(), torch.arange(4.0))


def test_rows_read_only_those_rows(tmp_path):
    path = tmp_path / "t.bin"
    torch.save(tensors(2), path)
    got = open_torch_zip(path)
    want = torch.load(path, weights_only=True)
    for name in ("f32", "base", "transposed", "window"):
        assert_same(got[name].rows([2, 0, 2]), want[name][[2, 0, 2]], name)
    with pytest.raises(IndexError):
        got["f32"].rows([5])


def test_safetensors_equals_load_file(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in tensors(3).items() if k not in ("transposed", "window", "row")},
              str(path), metadata={"format": "pt"})
    want = load_file(str(path))
    got = open_safetensors(path)
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        assert_same(got[name].load(), tensor, name)


@pytest.mark.parametrize("with_index", [True, False])
def test_sharded_safetensors_directory(tmp_path, with_index):
    state = {f"model.layers.{i}.w": torch.randn(3, 4, generator=torch.Generator().manual_seed(i)).bfloat16()
             for i in range(5)}
    shards = {"model-00001-of-00002.safetensors": list(state)[:3], "model-00002-of-00002.safetensors": list(state)[3:]}
    for file, names in shards.items():
        save_file({n: state[n] for n in names}, str(tmp_path / file))
    if with_index:
        weight_map = {n: file for file, names in shards.items() for n in names}
        (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    got = open_hf_weights(tmp_path)
    assert sorted(got) == sorted(state)
    for name, tensor in state.items():
        assert_same(got[name].load(), tensor, name)


def test_sharded_bin_directory(tmp_path):
    state = {f"model.layers.{i}.w": torch.randn(2, 3, generator=torch.Generator().manual_seed(i)).half()
             for i in range(4)}
    torch.save({k: state[k] for k in list(state)[:2]}, tmp_path / "pytorch_model-00001-of-00002.bin")
    torch.save({k: state[k] for k in list(state)[2:]}, tmp_path / "pytorch_model-00002-of-00002.bin")
    got = open_hf_weights(tmp_path)
    for name, tensor in state.items():
        assert_same(got[name].load(), tensor, name)


def test_index_naming_a_missing_shard(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "model-1.safetensors"}}))
    with pytest.raises(LoadError) as err:
        open_hf_weights(tmp_path)
    one_line(err, "model-1.safetensors", "missing")


def rewrite(path: Path, out: Path, entry: str, change) -> Path:
    """A copy of a torch zip with one entry's bytes changed (a valid zip: CRCs recomputed)."""
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            dst.writestr(info.filename, change(data) if info.filename.endswith(entry) else data)
    return out


def test_short_tensor_entry(tmp_path):
    """A storage entry shorter than data.pkl says: refused when opened, not when read."""
    path = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.ones(64, 64)}, path)
    bad = rewrite(path, tmp_path / "short.bin", "/data/0", lambda data: data[:100])
    with pytest.raises(LoadError) as err:
        open_checkpoint(bad)
    one_line(err, "short.bin", "corrupt or truncated", "100 bytes of 16384")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_garbage_pickle_is_one_line(tmp_path, seed):
    path = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.ones(3)}, path)
    noise = torch.randint(0, 256, (64,), generator=torch.Generator().manual_seed(seed)).to(torch.uint8)
    bad = rewrite(path, tmp_path / "noise.bin", "/data.pkl", lambda data: data[:2] + bytes(noise.tolist()))
    with pytest.raises(LoadError) as err:
        open_checkpoint(bad)
    one_line(err, "noise.bin")


def test_truncated_files_are_one_line(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.ones(64, 64)}, path)
    (tmp_path / "half.bin").write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(LoadError) as err:
        open_checkpoint(tmp_path / "half.bin")
    one_line(err, "half.bin", "corrupt or truncated")
    st = tmp_path / "model.safetensors"
    save_file({"w": torch.ones(64, 64)}, str(st))
    (tmp_path / "cut.safetensors").write_bytes(st.read_bytes()[:-100])
    with pytest.raises(LoadError) as err:
        open_safetensors(tmp_path / "cut.safetensors")
    one_line(err, "cut.safetensors", "corrupt or truncated", "tensor w")


@pytest.mark.parametrize("header", [b"\xff" * 8, (12).to_bytes(8, "little") + b"{not json!!}",
                                    (2).to_bytes(8, "little") + b"[]"])
def test_bad_safetensors_header(tmp_path, header):
    path = tmp_path / "x.safetensors"
    path.write_bytes(header + bytes(32))
    with pytest.raises(LoadError) as err:
        open_safetensors(path)
    one_line(err, "x.safetensors", "corrupt or truncated")


def test_damaged_bytes_fail_the_crc(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.ones(3)}, path)
    data = bytearray(path.read_bytes())
    start = data.index(b"\x80\x02")  # data.pkl's protocol header, the archive's first entry
    data[start + 2:start + 40] = bytes(range(38))
    path.write_bytes(bytes(data))
    with pytest.raises(LoadError) as err:
        open_checkpoint(path)
    one_line(err, str(path))


class Payload:
    def __reduce__(self):
        return (os.getcwd, ())


def test_disallowed_global_is_refused(tmp_path):
    """torch.load(weights_only=True) refuses arbitrary callables; so does the lazy reader,
    without calling them."""
    path = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.ones(2), "evil": Payload()}, path)
    with pytest.raises(LoadError) as err:
        open_checkpoint(path)
    one_line(err, "posix.getcwd", "never holds", "re-save")


def test_not_a_state_dict(tmp_path):
    torch.save([torch.ones(2)], tmp_path / "pytorch_model.bin")
    with pytest.raises(LoadError, match="does not hold a state dict of tensors"):
        open_checkpoint(tmp_path)


def test_missing_checkpoint(tmp_path: Path):
    with pytest.raises(LoadError, match="has no pytorch_model.bin"):
        open_checkpoint(tmp_path)
