"""Crash-safe publishing (export/publish.py): a publisher SIGKILLed right after each step leaves
--out holding the old export or the new one, whole, and the next export cleans what is left."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from export.publish import CRASH_ENV, STEPS, PublishError, publish, staged, stale_entries, swap_in
from runtime.contract import MANIFEST_NAME

REPO = Path(__file__).resolve().parents[1]

# A child that stages a "new" export over --out and publishes it; $DSVL_EDGE_CRASH_AT kills it.
CHILD = """
import sys
from pathlib import Path
from export.publish import publish, staged
out = Path(sys.argv[1])
with staged(out) as stage:
    (stage / "vision.onnx").write_text("new vision")
    (stage / "tokenizer").mkdir()
    (stage / "tokenizer" / "tokenizer.json").write_text("new tokenizer")
    publish(stage, out, ["vision.onnx", "tokenizer"], {"vision": {"sha": "%s"}})
"""


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def old_export(out: Path) -> None:
    (out / "tokenizer").mkdir(parents=True)
    (out / "tokenizer" / "tokenizer.json").write_text("old tokenizer")
    (out / "vision.onnx").write_text("old vision")
    (out / "decoder.onnx").write_text("old decoder")
    manifest = {"format": "dsvl-edge", "format_version": 1, "vision": {"sha": digest("old vision")},
                "decoder": {"sha": digest("old decoder")}}
    (out / MANIFEST_NAME).write_text(json.dumps(manifest))


def state(out: Path) -> str:
    """'old' or 'new' when ``out`` holds that export whole and consistent; anything else fails."""
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    vision = (out / "vision.onnx").read_text()
    tokenizer = (out / "tokenizer" / "tokenizer.json").read_text()
    assert (out / "decoder.onnx").read_text() == "old decoder"  # kept by both
    assert manifest["vision"]["sha"] == digest(vision)
    assert vision.split()[0] == tokenizer.split()[0], (vision, tokenizer)
    return vision.split()[0]


def run_child(out: Path, crash_at: str | None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop(CRASH_ENV, None)
    if crash_at:
        env[CRASH_ENV] = crash_at
    return subprocess.run([sys.executable, "-c", CHILD % digest("new vision"), str(out)], env=env,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("step", STEPS)
def test_kill_at_each_step_leaves_one_whole_export(tmp_path, step):
    out = tmp_path / "artifacts"
    old_export(out)
    proc = run_child(out, step)
    assert proc.returncode == -9, proc.stderr  # it really died by SIGKILL
    expected = "old" if STEPS.index(step) < STEPS.index("swapped") else "new"
    assert state(out) == expected
    # the next export cleans what the killed one left, then publishes whole
    leftovers = stale_entries(out)
    if step != "cleaned":
        assert leftovers, "the killed export left its staging directory"
    proc = run_child(out, None)
    assert proc.returncode == 0, proc.stderr
    assert ("removed" in proc.stdout) == bool(leftovers)
    assert state(out) == "new"
    assert stale_entries(out) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifacts"]


def test_fallback_without_exchange_restores_the_old_export(tmp_path, monkeypatch):
    """Without RENAME_EXCHANGE, a kill between the two renames leaves --out missing; the next
    export puts the old one back before anything else."""
    from export import publish as pub

    out = tmp_path / "artifacts"
    old_export(out)
    monkeypatch.setattr(pub, "exchange", lambda a, b: False)
    with staged(out) as stage:
        (stage / "vision.onnx").write_text("new vision")
        real_rename = os.rename

        def killed(src, dst):
            raise KeyboardInterrupt  # stands in for the kill, right after out moved aside

        monkeypatch.setattr(pub.os, "rename", killed)
        with pytest.raises(KeyboardInterrupt):
            publish(stage, out, ["vision.onnx"], {})
        monkeypatch.setattr(pub.os, "rename", real_rename)
    assert not out.exists()
    with staged(out):
        pass
    assert state(out) == "old" and stale_entries(out) == []


def test_swap_keeps_other_sections_and_user_files(tmp_path):
    out = tmp_path / "artifacts"
    old_export(out)
    (out / "notes.txt").write_text("mine")
    (out / ".manifest.verified.json").write_text("{}")  # a stamp of the old files: dropped
    with staged(out) as stage:
        (stage / "vision.onnx").write_text("new vision")
        (stage / "tokenizer").mkdir()
        (stage / "tokenizer" / "tokenizer.json").write_text("new tokenizer")
        manifest = publish(stage, out, ["vision.onnx", "tokenizer"], {"vision": {"sha": digest("new vision")}})
    assert state(out) == "new" and (out / "notes.txt").read_text() == "mine"
    assert manifest["decoder"] == {"sha": digest("old decoder")}
    assert not (out / ".manifest.verified.json").exists()


def test_failed_export_leaves_old_untouched_and_no_stage(tmp_path):
    out = tmp_path / "artifacts"
    old_export(out)
    with pytest.raises(RuntimeError), staged(out) as stage:
        (stage / "vision.onnx").write_text("new vision")
        raise RuntimeError("parity failed")
    assert state(out) == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["artifacts"]


def test_a_first_export_that_fails_leaves_nothing(tmp_path):
    out = tmp_path / "fresh"
    with pytest.raises(RuntimeError), staged(out):
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_concurrent_export_into_the_same_out_is_refused(tmp_path):
    out = tmp_path / "artifacts"
    with staged(out), pytest.raises(PublishError, match="another export"), staged(out):
        pass


def test_swap_onto_a_mount_point_is_a_clear_error(tmp_path, monkeypatch):
    from export import publish as pub

    out = tmp_path / "artifacts"
    old_export(out)

    def busy(a, b):
        raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), str(b))

    monkeypatch.setattr(pub, "exchange", busy)
    with staged(out) as stage, pytest.raises(PublishError, match="subdirectory"):
        swap_in(stage, out)
    assert state(out) == "old"


def test_exporter_killed_while_publishing_keeps_the_old_export(exported, tmp_path):
    """A real exporter (export.vision: the same publisher as export.all, and faster), killed
    after staging its new files beside an existing export."""
    import shutil

    from runtime.artifacts import open_artifacts

    out = tmp_path / "artifacts"
    shutil.copytree(exported("--vis-proj", "perceiver"), out)
    before = (out / MANIFEST_NAME).read_text()
    env = dict(os.environ, PYTHONPATH=str(REPO), **{CRASH_ENV: "carried"})
    proc = subprocess.run([sys.executable, "-m", "export.vision", "--seed", "3", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr
    assert (out / MANIFEST_NAME).read_text() == before
    open_artifacts(out, verify_hash=True)  # whole: every file matches its full hash
    assert stale_entries(out)  # the killed export's staging directory, for the next export to clean
