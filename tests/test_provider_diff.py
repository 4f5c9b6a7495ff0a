"""scripts/provider_diff.py on the CPU: the CPU provider against itself agrees at every node
output, for the in-place and MMCA graphs (the GPU session compares cpu with cuda)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from scripts.provider_diff import main  # noqa: E402


@pytest.mark.parametrize("flags", [("--vis-proj", "perceiver"),
                                   ("--vis-proj", "perceiver", "--enable-mmca-attention", "--seed", "1")],
                         ids=["causal", "mmca"])
def test_one_provider_agrees_with_itself_at_every_node(exported, flags, tmp_path, capsys):
    report_path = tmp_path / "diff.json"
    assert main(["--artifacts", str(exported(*flags)), "--providers", "cpu,cpu", "--json", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    assert report["bad"] == 0 and report["nodes"] > 40 and not report["first_bad"]
    lengths = [r for r in report["small_outputs"] if r["op"] == "ReduceSum"]
    assert lengths and lengths[0]["want"] == lengths[0]["got"] == [8]  # the mask's 8 positions
    assert "0 of" in capsys.readouterr().out


def test_providers_must_be_two_known_names(capsys):
    with pytest.raises(SystemExit):
        main(["--artifacts", ".", "--providers", "cpu"])
    assert "two of cpu, cuda" in capsys.readouterr().err
