"""Shared fixtures: artefact directories exported once per test session."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest


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
