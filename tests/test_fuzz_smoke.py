"""scripts/fuzz_cli.py runs in CI: seeded cases (one per CLI), none may end in a traceback,
a hang or an exit code other than 0/1/2/130."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "fuzz_cli.py"


@pytest.fixture(scope="module")
def fuzz():
    spec = importlib.util.spec_from_file_location("fuzz_cli", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["fuzz_cli"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_fuzz_smoke(fuzz, exported, tmp_path, capsys):
    base = exported("--vis-proj", "perceiver")
    summary_path = tmp_path / "fuzz.json"
    count = len(fuzz.CLIS)
    code = fuzz.main(["--artifacts", str(base), "--count", str(count), "--seed", "0", "--timeout", "120",
                      "--json", str(summary_path)])
    out = capsys.readouterr().out
    summary = json.loads(out.strip().splitlines()[-1])
    assert code == 0, summary["failures"]
    assert summary["runs"] == count and set(summary["per_cli"]) == set(fuzz.CLIS)
    assert json.loads(summary_path.read_text())["runs"] == count


@pytest.mark.parametrize("body,problem", [
    ("raise RuntimeError('boom')", "traceback"),
    ("import sys; sys.exit(3)", "exit code 3"),
    ("import time; time.sleep(1000)", "hang: no exit within 2 s"),
    ("print('fine')", None),
])
def test_fuzz_oracle(fuzz, tmp_path, monkeypatch, body, problem):
    """What counts as a failure: a traceback, an exit code outside 0/1/2/130, a hang."""
    (tmp_path / "fuzz_target.py").write_text(body + "\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    outcome = fuzz.run_case(fuzz.Case("fuzz_target", []), timeout=2)
    assert outcome.problem == problem
