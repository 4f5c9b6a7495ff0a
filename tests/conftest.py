"""Shared fixtures: artefact directories exported once per test session."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

# Loading a decoder moves the memory it grew onto huge pages (runtime/hugepages.py). In this one
# large process, where hundreds of sessions load, that copying costs over a minute of the suite;
# tests/test_hugepages.py turns it back on where it is the subject. Subprocesses inherit it.
os.environ.setdefault("DSVL_EDGE_HUGE_PAGES", "0")


@pytest.fixture(scope="session")
def exported(tmp_path_factory) -> Callable[..., Path]:
    """``exported(*export_all_flags)`` -> an artefact dir from ``export.all``, made once per
    session for each set of flags and shared by every test module."""
    from export import all as export_all

    cache: dict[tuple[str, ...], Path] = {}

    def get(*flags: str) -> Path:
        if flags not in cache:
            out = tmp_path_factory.mktemp("artifacts")
            assert export_all.main([*flags, "--out", str(out)]) == 0, f"export.all {flags} failed"
            cache[flags] = out
        return cache[flags]

    return get


@pytest.fixture(scope="session")
def kv8_export(exported, tmp_path_factory) -> Path:
    """The baseline export quantized to int4 with an int8 KV cache (export.quantize --kv-cache
    int8), made once per session."""
    from export import quantize

    out = tmp_path_factory.mktemp("kv8") / "artifacts"
    source = exported("--vis-proj", "baseline")
    assert quantize.main(["--artifacts", str(source), "--out", str(out), "--kv-cache", "int8"]) == 0
    return out
