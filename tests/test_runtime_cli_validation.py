"""Runtime flags and requests refused up front, with the flag named: no silent defaults, no
NaN deep in sampling, no work done before a bad seed is noticed, non-UTF-8 text caught."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from runtime import chat, generate
from runtime.backends import load_runners
from runtime.preprocess import ImageError
from runtime.sampling import SamplingOptions

REPO = Path(__file__).resolve().parents[1]


def parse_error(parse, argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        parse(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


@pytest.mark.parametrize("parse", [generate.parse_args, chat.parse_args])
@pytest.mark.parametrize("flag,value,needle", [
    ("--max-context", "-5", "must be at least 1"), ("--max-context", "0", "must be at least 1"),
    ("--seed", "-1", "out of range"), ("--seed", str(2**32), "out of range"),
    ("--temperature", "nan", "not a finite number"), ("--temperature", "inf", "not a finite number"),
    ("--repetition-penalty", "nan", "not a finite number"), ("--top-p", "-inf", "not a finite number"),
    ("--max-new-tokens", "0", "at least 1"), ("--top-k", "-2", "0 or more"), ("--threads", "-1", "0 or more"),
    ("--max-image-pixels", "0", "at least 1"), ("--max-image-aspect", "nan", "not a finite number"),
])
def test_bad_flag_is_refused_at_parsing(parse, flag, value, needle, capsys):
    argv = [f"{flag}={value}"] + (["--prompt", "hi"] if parse is generate.parse_args else [])
    line = parse_error(parse, argv, capsys)
    assert f"argument {flag}" in line and needle in line, line


def test_non_utf8_prompt_is_refused(capsys):
    line = parse_error(generate.parse_args, ["--prompt", "a\udcffb"], capsys)
    assert "argument --prompt" in line and "not valid UTF-8" in line


def test_non_utf8_prompt_from_a_real_argv(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), LC_ALL="C.UTF-8")
    proc = subprocess.run([sys.executable, "-m", "runtime.generate", "--artifacts", str(tmp_path),
                           "--prompt", b"caf\xe9"], env=env, capture_output=True, timeout=60)
    err = proc.stderr.decode()
    assert proc.returncode == 2 and "Traceback" not in err and "not valid UTF-8" in err


@pytest.mark.parametrize("field,value", [("temperature", math.nan), ("temperature", math.inf),
                                         ("repetition_penalty", math.nan), ("top_p", math.nan),
                                         ("seed", -1)])
def test_sampling_options_refuse_non_finite_values(field, value):
    options = SamplingOptions(**{field: value})
    with pytest.raises(ValueError, match=f"--{field.replace('_', '-')}"):
        options.validate()


@pytest.fixture(scope="module")
def base(exported) -> Path:
    return exported("--vis-proj", "perceiver")


@pytest.mark.parametrize("max_context", [0, -5])
def test_api_max_context_zero_is_not_the_default(base, max_context):
    from runtime.artifacts import open_artifacts

    with pytest.raises(ValueError, match=f"--max-context {max_context} must be a positive"):
        load_runners(open_artifacts(base), max_context=max_context)


@pytest.fixture(scope="module")
def pipe(base):
    from runtime.pipeline import Pipeline

    return Pipeline.from_artifacts(base, threads=2)


def test_a_single_path_is_one_image(pipe, tmp_path):
    path = tmp_path / "one-image-path-of-24-chars.png"[-24:]
    Image.fromarray(np.full((40, 30, 3), 90, np.uint8)).save(path)
    options = SamplingOptions(max_new_tokens=2)
    one = pipe.generate(str(path), "Hi", options)
    listed = pipe.generate([str(path)], "Hi", options)
    assert one.tokens == listed.tokens and one.prompt_ids == listed.prompt_ids


def test_zero_size_array_through_the_pipeline(pipe):
    with pytest.raises(ImageError, match="no pixels"):
        pipe.generate([np.zeros((0, 0, 3), np.uint8)], "Hi", SamplingOptions(max_new_tokens=2))


def run_generate(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "runtime.generate", *args], env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli_image_limits_name_the_flag(base, tmp_path):
    wide = tmp_path / "wide.png"
    Image.fromarray(np.zeros((1, 5000), np.uint8)).save(wide)
    square = tmp_path / "square.png"
    Image.fromarray(np.zeros((100, 100), np.uint8)).save(square)
    proc = run_generate("--artifacts", str(base), "--image", str(wide), "--prompt", "Hi")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "--max-image-aspect" in proc.stderr
    proc = run_generate("--artifacts", str(base), "--image", str(square), "--prompt", "Hi",
                        "--max-image-pixels", "9999")
    assert proc.returncode == 2 and "--max-image-pixels" in proc.stderr.strip().splitlines()[-1]
    proc = run_generate("--artifacts", str(base), "--image", str(tmp_path), "--prompt", "Hi")
    assert proc.returncode == 2 and "is a directory" in proc.stderr


def test_chat_image_command_honours_the_limit_flags(base, tmp_path):
    wide = tmp_path / "wide.png"
    Image.fromarray(np.zeros((10, 600), np.uint8)).save(wide)  # 60:1, over the default 50:1
    env = dict(os.environ, PYTHONPATH=str(REPO))

    def chat_run(*flags: str) -> str:
        proc = subprocess.run([sys.executable, "-m", "runtime.chat", "--artifacts", str(base), *flags],
                              input=f"/image {wide}\n/quit\n", env=env, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
        return proc.stderr

    assert "--max-image-aspect" in chat_run()
    assert "(1 image(s) attached)" in chat_run("--max-image-aspect", "100")
