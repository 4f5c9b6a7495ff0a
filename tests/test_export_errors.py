"""Exporter failures a user can cause, each one ``error:`` line and exit 2, never a traceback:
a full disk, a checkpoint that is text or garbage, an unsupported opset, a bad seed, a corrupt
artefact handed to export.quantize. Bad files are made here, from fixed seeds."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from dsvl.errors import LoadError
from dsvl.loading import read_checkpoint
from export import quantize as q
from export import vision as vis
from export.cli import run_cli
from runtime.contract import MANIFEST_NAME


def cli(main, argv: list[str], capsys) -> tuple[int, str, str]:
    """Run an entry point as its ``__main__`` does: (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: main(argv))
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def one_error_line(code: int, err: str, *needles: str) -> str:
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def base(exported) -> Path:
    return exported("--vis-proj", "perceiver")  # shared with test_runtime_errors


def garbage(path: Path, seed: int) -> Path:
    path.write_bytes(np.random.default_rng(seed).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    return path


# Fixed garbage that makes torch.load's unpickler raise IndexError (seed 17: "pop from empty
# list") and KeyError (seed 62: a memo key), as torch 2.13 reads them; a text file is a KeyError.
@pytest.mark.parametrize("seed", [17, 62, 0, 54])
def test_garbage_checkpoint_is_a_load_error(tmp_path, seed):
    path = garbage(tmp_path / "pytorch_model.bin", seed)
    with pytest.raises(LoadError, match="is corrupt or truncated") as err:
        read_checkpoint(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_text_file_as_checkpoint_is_a_load_error(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello world\nthis is text\n")
    with pytest.raises(LoadError, match="notes.txt is corrupt or truncated"):
        read_checkpoint(path)


@pytest.mark.parametrize("opset", ["99", "16", "abc"])
def test_unsupported_opset_is_refused_before_loading(tmp_path, capsys, opset):
    code, out, err = cli(vis.main, ["--opset", opset, "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and "Traceback" not in err and "argument --opset" in err
    assert "17 to 20" in err or "not an integer" in err
    assert out == "" and not (tmp_path / "out").exists()  # before any loading


def test_negative_seed_is_refused_at_parsing(tmp_path, capsys):
    code, out, err = cli(vis.main, ["--seed", "-1", "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and "argument --seed" in err and out == ""


def test_full_disk_is_one_line_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    import onnx_ir

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "out" / "vision.onnx"))

    monkeypatch.setattr(onnx_ir, "save", full)  # what export/torch_onnx.py writes the graph with
    out = tmp_path / "out"
    code, stdout, err = cli(vis.main, ["--out", str(out)], capsys)
    one_error_line(code, err, "no space left on device", "free space")
    assert "wrote" not in stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and list(out.iterdir()) == []


def test_other_os_errors_still_surface(tmp_path, capsys, monkeypatch):
    """Only disk-full kinds are user errors: a bug stays a traceback, not a vague line."""
    import onnx_ir

    def broken(*args, **kwargs):
        raise OSError(errno.EBADF, "Bad file descriptor")

    monkeypatch.setattr(onnx_ir, "save", broken)
    with pytest.raises(OSError):
        run_cli(lambda: vis.main(["--out", str(tmp_path / "out")]))


def copy_export(base: Path, tmp_path: Path) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(base, out)
    return out


def test_quantize_object_npy_is_one_line(base, tmp_path, capsys):
    art = copy_export(base, tmp_path)
    np.save(art / "lang_embed.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    code, out, err = cli(q.main, ["--artifacts", str(art), "--out", str(tmp_path / "q")], capsys)
    one_error_line(code, err, "lang_embed.npy", "not a numeric .npy table")
    assert not (tmp_path / "q").exists()


def test_quantize_truncated_onnx_is_one_line(base, tmp_path, capsys):
    art = copy_export(base, tmp_path)
    data = (art / "decoder.onnx").read_bytes()
    (art / "decoder.onnx").write_bytes(data[: len(data) // 3])
    code, out, err = cli(q.main, ["--artifacts", str(art), "--out", str(tmp_path / "q")], capsys)
    one_error_line(code, err, "decoder.onnx", "does not match manifest.json")


@pytest.mark.parametrize("manifest", [[], {"format": "dsvl-edge", "format_version": 1},
                                      {"format": "dsvl-edge", "format_version": 1, "decoder": []}])
def test_quantize_bad_manifest_is_one_line(base, tmp_path, capsys, manifest):
    art = copy_export(base, tmp_path)
    (art / MANIFEST_NAME).write_text(json.dumps(manifest))
    code, out, err = cli(q.main, ["--artifacts", str(art), "--out", str(tmp_path / "q")], capsys)
    one_error_line(code, err, "manifest.json")


def test_quantize_negative_seed_is_refused_at_parsing(tmp_path, capsys):
    """Found by scripts/fuzz_cli.py: numpy's ValueError came after loading the model."""
    code, out, err = cli(q.main, ["--artifacts", str(tmp_path), "--seed", "-1"], capsys)
    assert code == 2 and "argument --seed" in err and "Traceback" not in err
