"""User-facing failures of the runtime: each one a typed error with a clear one-line message,
and on the command line a non-zero exit with one ``error:`` line and no traceback."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from runtime.contract import ArtifactError
from runtime.pipeline import InputError, Pipeline
from runtime.preprocess import ImageError
from runtime.prompt import MAX_IMAGES
from runtime.sampling import SamplingOptions

REPO = Path(__file__).resolve().parents[1]
OPTIONS = SamplingOptions(max_new_tokens=4)


@pytest.fixture(scope="session")
def base(exported) -> Path:
    return exported("--vis-proj", "perceiver")


@pytest.fixture(scope="session")
def other(exported) -> Path:
    """Another export: different seed (same-size tables, other values) and MMCA (other graph)."""
    return exported("--vis-proj", "perceiver", "--enable-mmca-attention",
                    "--seed", "1")


@pytest.fixture(scope="session")
def pipe(base) -> Pipeline:
    return Pipeline.from_artifacts(base, threads=2)


@pytest.fixture(scope="session")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("error-images")
    good = root / "good.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(good)
    empty = root / "empty.png"
    empty.write_bytes(b"")
    garbage = root / "garbage.jpg"
    garbage.write_bytes(np.random.default_rng(1).integers(0, 256, 3000, dtype=np.uint8).tobytes())
    truncated = root / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:200])
    return {"good": good, "empty": empty, "garbage": garbage, "truncated": truncated,
            "missing": root / "no-such-image.png"}


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert message and "\n" not in message, repr(message)
    return message


# ------------------------------------------------------------------ inputs
def test_prompt_longer_than_the_context(base, files):
    small = Pipeline.from_artifacts(base, max_context=64, threads=2)
    assert small.decoder.max_context == 64
    with pytest.raises(InputError) as err:
        small.generate([files["good"]], "What is in the picture?", OPTIONS)
    message = one_line(err)
    assert "64" in message and "context" in message and "positions" in message
    # text alone is also too long for 64 positions (the system prompt is longer)
    with pytest.raises(InputError, match="context holds 64"):
        small.generate([], "What is in the picture? " * 4, OPTIONS)
    # the pipeline stays usable after the error
    result = small.generate([], "Hi", OPTIONS, raw_prompt=True)
    assert len(result.tokens) == 4
    assert result.tokens == Pipeline.from_artifacts(base, max_context=64).generate(
        [], "Hi", OPTIONS, raw_prompt=True).tokens


def test_generation_stops_at_the_context_end(base):
    small = Pipeline.from_artifacts(base, max_context=16, threads=2)
    result = small.generate([], "Hi there", SamplingOptions(max_new_tokens=100), raw_prompt=True)
    assert result.stop_reason == "context"
    assert small.decoder.past_length == 16
    # the last sampled token is returned but there is no room to feed it
    assert len(result.tokens) == 16 - len(result.prompt_ids) + 1


@pytest.mark.parametrize(("prompt", "count"), [
    ("<image> describe it", 2),  # more images than <image> tokens
    ("<image> and <image>: compare", 1),  # fewer
    ("no image token at all", 1),
    ("<image> where is it?", 0),
])
def test_image_count_must_match_image_tokens(pipe, files, prompt, count):
    with pytest.raises(InputError) as err:
        pipe.generate([files["good"]] * count, prompt, OPTIONS, raw_prompt=True)
    message = one_line(err)
    assert "<image>" in message and f"{count} images" in message


def test_more_than_eight_images_with_the_template(pipe, files):
    with pytest.raises(InputError) as err:
        pipe.generate([files["good"]] * (MAX_IMAGES + 1), "Compare them.", OPTIONS)
    message = one_line(err)
    assert str(MAX_IMAGES) in message and str(MAX_IMAGES + 1) in message
    chat = pipe.chat()
    with pytest.raises(InputError):
        chat.ask("Compare them.", [files["good"]] * (MAX_IMAGES + 1), OPTIONS)
    assert chat.history == [] and chat.turns == []


@pytest.mark.parametrize("kind", ["empty", "garbage", "truncated", "missing"])
def test_unreadable_image_names_the_file(pipe, files, kind):
    with pytest.raises(ImageError) as err:
        pipe.generate([files["good"], files[kind]], "Compare them.", OPTIONS)
    message = one_line(err)
    assert str(files[kind]) in message
    if kind == "empty":
        assert "empty" in message


def test_invalid_sampling_options(pipe):
    for bad in (SamplingOptions(max_new_tokens=0), SamplingOptions(temperature=0.0),
                SamplingOptions(top_p=1.5), SamplingOptions(top_k=-1)):
        with pytest.raises(ValueError):
            pipe.generate([], "Hi", bad, raw_prompt=True)


# ------------------------------------------------------------------ artefacts
def mixed(base: Path, other: Path, tmp_path: Path, name: str) -> Path:
    copy = tmp_path / "mixed"
    shutil.copytree(base, copy)
    shutil.copyfile(other / name, copy / name)
    return copy


def test_decoder_from_another_export(base, other, tmp_path):
    copy = mixed(base, other, tmp_path, "decoder.onnx")
    with pytest.raises(ArtifactError) as err:
        Pipeline.from_artifacts(copy)
    message = one_line(err)
    assert "decoder.onnx" in message and "different export" in message


def test_prompt_table_from_another_export_is_caught_by_the_hash_check(base, other, tmp_path):
    copy = mixed(base, other, tmp_path, "lang_embed.npy")
    # same shape, same size: only the sha256 check can tell
    assert (copy / "lang_embed.npy").stat().st_size == (base / "lang_embed.npy").stat().st_size
    with pytest.raises(ArtifactError) as err:
        Pipeline.from_artifacts(copy, verify_hash=True)
    message = one_line(err)
    assert "lang_embed.npy" in message and "different export" in message
    Pipeline.from_artifacts(base, verify_hash=True)  # the untouched export passes


def test_same_size_swap_is_caught_without_hashing(base, other, tmp_path):
    copy = mixed(base, other, tmp_path, "lang_embed.npy")
    with pytest.raises(ArtifactError):
        Pipeline.from_artifacts(copy)


def test_missing_artifact_dir_and_files(base, tmp_path):
    with pytest.raises(ArtifactError) as err:
        Pipeline.from_artifacts(tmp_path / "nowhere")
    message = one_line(err)
    assert "nowhere" in message and "not found" in message and "export.all" in message
    copy = tmp_path / "partial"
    shutil.copytree(base, copy)
    (copy / "vision.onnx").unlink()
    with pytest.raises(ArtifactError, match="vision.onnx is missing"):
        Pipeline.from_artifacts(copy)
    (copy / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match="manifest.json not found"):
        Pipeline.from_artifacts(copy)


# ------------------------------------------------------------------ command line
def run_generate(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "runtime.generate", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def assert_cli_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == errors[0]
    for needle in needles:
        assert needle in errors[0], errors[0]


@pytest.mark.parametrize("case", ["missing-dir", "empty-image", "too-long", "too-many-images"])
def test_cli_errors_are_one_line(base, files, tmp_path, case):
    if case == "missing-dir":
        proc = run_generate("--artifacts", str(tmp_path / "nowhere"), "--prompt", "Hi", cwd=tmp_path)
        assert_cli_error(proc, "nowhere", "not found")
    elif case == "empty-image":
        proc = run_generate("--artifacts", str(base), "--image", str(files["empty"]), "--prompt", "Hi",
                            cwd=tmp_path)
        assert_cli_error(proc, str(files["empty"]), "empty")
    elif case == "too-long":
        proc = run_generate("--artifacts", str(base), "--max-context", "64", "--image",
                            str(files["good"]), "--prompt", "Hi", "--json", cwd=tmp_path)
        assert_cli_error(proc, "context holds 64")
        assert proc.stdout == ""
    else:
        proc = run_generate("--artifacts", str(base), *["--image", str(files["good"])] * 9,
                            "--prompt", "Hi", cwd=tmp_path)
        assert_cli_error(proc, "at most 8")


def test_cli_help_and_success(base, files, tmp_path):
    proc = run_generate("--help", cwd=tmp_path)
    assert proc.returncode == 0 and "--artifacts" in proc.stdout and proc.stderr == ""
    proc = run_generate("--artifacts", str(base), "--image", str(files["good"]), "--prompt", "Hi",
                        "--max-new-tokens", "3", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert '"generated_ids"' in proc.stdout


def test_traced_shared_kv_cache_refuses_mmca(tmp_path):
    """The fused graph builds MMCA over the in-place cache; the tracer's GQA patch cannot."""
    from export import all as export_all
    from export.common import ExportError

    out = tmp_path / "out"
    with pytest.raises(ExportError, match="--decoder-graph fused"):
        export_all.main(["--kv-cache", "shared", "--enable-mmca-attention", "--decoder-graph",
                         "traced", "--out", str(out)])
    assert not (out / "manifest.json").exists() and not list(out.glob(".partial-*"))
