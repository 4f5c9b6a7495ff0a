"""Broken artefact directories: every manifest field missing or mistyped, a manifest that is a
list, a missing or mismatched preprocessor config, files changed behind the manifest's back.
Each is an ArtifactError with one line, never a KeyError or a traceback; and the verified stamp
keeps full-hash loads fast without trusting a file that changed."""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from runtime import integrity
from runtime.artifacts import open_artifacts
from runtime.contract import MANIFEST_NAME, PREPROCESSOR_NAME, STAMP_NAME, ArtifactError


@pytest.fixture(scope="module")
def base(exported) -> Path:
    return exported("--vis-proj", "perceiver")  # shared with test_runtime_errors


@pytest.fixture
def art(base, tmp_path) -> Path:
    out = tmp_path / "art"
    shutil.copytree(base, out)
    (out / STAMP_NAME).unlink(missing_ok=True)  # another module may have verified the shared base
    return out


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert message and "\n" not in message, repr(message)
    return message


def leaves(node, path=()):
    """Every (path, value) under the sections the runtime reads (parity results excluded)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key not in ("parity", "versions"):
                yield from leaves(value, (*path, key))
    if path:
        yield path, node


def mutated(manifest: dict, path: tuple, value) -> dict:
    new = copy.deepcopy(manifest)
    node = new
    for key in path[:-1]:
        node = node[key]
    if value is KeyError:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return new


def test_every_missing_or_mistyped_field_is_an_artifact_error(art):
    """About 250 variants: delete each field the runtime reads, or give it a wrong type."""
    manifest = json.loads((art / MANIFEST_NAME).read_text())
    paths = [p for section in ("vision", "decoder", "tokenizer") for p, _ in leaves(manifest[section], (section,))]
    assert len(paths) > 40
    failures, refused = [], 0
    for path in paths:
        for value in (KeyError, None, "x", [], -1, {}):
            (art / MANIFEST_NAME).write_text(json.dumps(mutated(manifest, path, value)))
            try:
                open_artifacts(art)
            except ArtifactError as err:
                refused += 1
                assert "\n" not in str(err)
            except Exception as err:  # noqa: BLE001 - exactly what this test hunts
                failures.append(f"{'.'.join(path)}={value!r}: {type(err).__name__}: {err}")
    assert not failures, "\n".join(failures[:20])
    assert refused > len(paths) * 3  # most variants are refused (a few fields are not read)


@pytest.mark.parametrize("text,needle", [("[]", "holds a JSON list"), ("42", "holds a JSON int"),
                                         ("{", "not valid JSON"),
                                         ('{"format": "dsvl-edge", "format_version": 2}', "format_version 2, written by a newer"),
                                         ('{"format": "dsvl-edge", "format_version": 0}', "format_version 0, older"),
                                         ("\udcff", "not valid JSON")])
def test_manifest_that_is_not_an_object(art, text, needle):
    (art / MANIFEST_NAME).write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(ArtifactError, match=needle) as err:
        open_artifacts(art)
    one_line(err)


def test_manifest_without_format_version_is_read_as_version_1(art):
    """The layout never changed before format_version existed: such a manifest opens."""
    manifest = json.loads((art / MANIFEST_NAME).read_text())
    del manifest["format_version"]
    (art / MANIFEST_NAME).write_text(json.dumps(manifest))
    assert open_artifacts(art).manifest.format_version == 1
    (art / MANIFEST_NAME).write_text('{"format": "dsvl-edge"}')  # version 1, but empty
    with pytest.raises(ArtifactError, match="has no 'vision' section") as err:
        open_artifacts(art)
    one_line(err)


def test_manifest_path_cannot_leave_the_directory(art):
    manifest = json.loads((art / MANIFEST_NAME).read_text())
    manifest["vision"]["file"]["path"] = "../../etc/passwd"
    (art / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="vision.file.path must be a path inside the directory"):
        open_artifacts(art)


def test_missing_preprocessor_config(art):
    (art / PREPROCESSOR_NAME).unlink()
    with pytest.raises(ArtifactError, match="preprocessor_config.json is missing") as err:
        open_artifacts(art)
    one_line(err)


def strip_preprocessor_hash(art: Path) -> None:
    """As an export made before the manifest hashed preprocessor_config.json."""
    manifest = json.loads((art / MANIFEST_NAME).read_text())
    del manifest["vision"]["preprocessor_file"]
    (art / MANIFEST_NAME).write_text(json.dumps(manifest))


def test_missing_preprocessor_config_in_an_older_export(art):
    strip_preprocessor_hash(art)
    (art / PREPROCESSOR_NAME).unlink()
    with pytest.raises(ArtifactError, match="preprocessor_config.json is missing"):
        open_artifacts(art)


@pytest.mark.parametrize("change,needle", [
    ({"crop_size": {"height": 48, "width": 48}}, "gives 48x48 images but vision.onnx takes"),
    ({"do_center_crop": False}, "gives variable-size images"),
    ({"size": "big"}, "not a usable preprocessor config"),
])
def test_preprocessor_that_does_not_fit_vision_onnx(art, change, needle):
    strip_preprocessor_hash(art)  # the hash would catch the edit first; test the size check itself
    config = json.loads((art / PREPROCESSOR_NAME).read_text()) | change
    (art / PREPROCESSOR_NAME).write_text(json.dumps(config))
    with pytest.raises(ArtifactError, match=needle) as err:
        open_artifacts(art)
    one_line(err)


@pytest.mark.parametrize("name", [PREPROCESSOR_NAME, "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json"])
def test_manifest_hashes_tokenizer_and_preprocessor(art, name):
    path = art / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit, same size
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="does not match manifest.json") as err:
        open_artifacts(art)
    assert name.split("/")[-1] in one_line(err)


def test_corrupt_tokenizer_in_an_older_export(art):
    manifest = json.loads((art / MANIFEST_NAME).read_text())
    del manifest["tokenizer"]["files"]
    (art / MANIFEST_NAME).write_text(json.dumps(manifest))
    (art / "tokenizer" / "tokenizer.json").write_text("{ not json")
    with pytest.raises(ArtifactError, match="holds no usable tokenizer"):
        open_artifacts(art)


def flip_unsampled_byte(path: Path) -> None:
    """Flip a byte the fingerprint does not read (needs a file over 3 MiB), keeping the mtime."""
    st = path.stat()
    with open(path, "r+b") as fh:
        fh.seek(2 << 20)  # between the start and middle samples
        byte = fh.read(1)
        fh.seek(2 << 20)
        fh.write(bytes([byte[0] ^ 0xFF]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def big_table_export(art: Path) -> Path:
    """Make lang_embed.npy large enough (4 MiB) that the fingerprint samples only part of it."""
    from runtime.manifest import FileEntry

    table = np.random.default_rng(0).standard_normal((8192, 128)).astype(np.float32)
    manifest = json.loads((art / MANIFEST_NAME).read_text())
    manifest["decoder"]["vocab_size"] = 8192
    np.save(art / "lang_embed.npy", table)
    np.save(art / "embed_tokens.npy", table)
    for key, name in (("prompt_embeddings", "lang_embed.npy"), ("decoder_embeddings", "embed_tokens.npy")):
        manifest["decoder"][key] = FileEntry.describe(art, name).to_dict()
    (art / MANIFEST_NAME).write_text(json.dumps(manifest))
    return art / "lang_embed.npy"


def test_fast_check_misses_an_unsampled_byte_full_check_catches_it(art):
    """What docs/runtime.md promises: the default check cannot see a byte it did not read."""
    table = big_table_export(art)
    open_artifacts(art)
    flip_unsampled_byte(table)
    open_artifacts(art)  # not caught by sizes + fingerprint, as documented
    with pytest.raises(ArtifactError, match="lang_embed.npy does not match manifest.json .sha256 differs"):
        open_artifacts(art, verify_hash=True)


def test_verified_stamp_skips_unchanged_files_and_rehashes_changed_ones(art, monkeypatch):
    table = big_table_export(art)
    hashed = []
    real = integrity.sha256_file
    monkeypatch.setattr(integrity, "sha256_file", lambda p: hashed.append(Path(p).name) or real(p))
    open_artifacts(art)
    assert hashed == [] and not (art / STAMP_NAME).exists()  # the default check hashes nothing
    open_artifacts(art, verify_hash=True)
    assert len(hashed) >= 6 and (art / STAMP_NAME).is_file()  # every file, once
    stamp = json.loads((art / STAMP_NAME).read_text())
    assert {"bytes", "mtime_ns", "ino", "sha256"} <= set(stamp["files"]["lang_embed.npy"])
    hashed.clear()
    open_artifacts(art, verify_hash=True)
    assert hashed == []  # stamped and unchanged: fast
    # rewrite the table with the same bytes: re-verified, on a default load. The file system may
    # hand back the same inode and, within its clock's granularity, the same mtime, so move the
    # mtime explicitly as a later write would (no dependence on timing).
    data, before = table.read_bytes(), table.stat()
    table.unlink()
    table.write_bytes(data)
    os.utime(table, ns=(before.st_atime_ns, before.st_mtime_ns + 10**6))
    open_artifacts(art)
    assert hashed == ["lang_embed.npy"]
    # a changed byte, mtime restored but inode the same: stat still matches, so trusted...
    hashed.clear()
    st = table.stat()
    flip_unsampled_byte(table)
    os.utime(table, ns=(st.st_atime_ns, st.st_mtime_ns + 1))  # ...unless mtime moved, as a write does
    with pytest.raises(ArtifactError, match="sha256 differs"):
        open_artifacts(art)
    assert hashed == ["lang_embed.npy"]


def test_stamp_of_another_manifest_is_ignored(art, monkeypatch):
    open_artifacts(art, verify_hash=True)
    manifest = json.loads((art / MANIFEST_NAME).read_text())
    manifest["note"] = "re-exported"
    (art / MANIFEST_NAME).write_text(json.dumps(manifest))
    hashed = []
    real = integrity.sha256_file
    monkeypatch.setattr(integrity, "sha256_file", lambda p: hashed.append(p) or real(p))
    open_artifacts(art)
    assert hashed == []  # the stamp no longer counts: back to the fast check


def test_read_only_directory_loads_without_a_stamp(art, monkeypatch):
    monkeypatch.setattr(integrity, "write_stamp", lambda *a: False)
    open_artifacts(art, verify_hash=True)
    assert not (art / STAMP_NAME).exists()


@pytest.mark.parametrize("field,value", [("num_layers", 3), ("num_layers", 0), ("num_kv_heads", 4),
                                         ("head_dim", 16)])
def test_decoder_graph_that_does_not_fit_the_manifest(art, field, value):
    """Fields that pass validation but contradict decoder.onnx: caught when the session opens."""
    from runtime.pipeline import Pipeline

    manifest = json.loads((art / MANIFEST_NAME).read_text())
    manifest["decoder"][field] = value
    (art / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="decoder.onnx") as err:
        Pipeline.from_artifacts(art, threads=1)
    one_line(err)


def test_preprocessor_size_that_does_not_fit_vision_onnx_input(art):
    """Manifest and preprocessor agree on 48 px, but vision.onnx takes the export's size."""
    from runtime.pipeline import Pipeline

    strip_preprocessor_hash(art)
    manifest = json.loads((art / MANIFEST_NAME).read_text())
    manifest["vision"]["image_size"] = 48
    (art / MANIFEST_NAME).write_text(json.dumps(manifest))
    config = json.loads((art / PREPROCESSOR_NAME).read_text())
    config |= {"crop_size": {"height": 48, "width": 48}, "size": {"shortest_edge": 48}}
    (art / PREPROCESSOR_NAME).write_text(json.dumps(config))
    with pytest.raises(ArtifactError, match="pixel_values has size .* manifest.json says 48") as err:
        Pipeline.from_artifacts(art, threads=1)
    one_line(err)
