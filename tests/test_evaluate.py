"""``python -m runtime.evaluate``'s input checks and output, without a model: DSVL's eval JSON
read as batch_generation.py reads it, one-line errors, and a CSV written whole or not at all.
Its answers are checked against DSVL's own batch_generation.py in tests/test_dsvl_original.py."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from runtime import evaluate
from runtime.cli import exit_status
from runtime.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


def test_reads_dsvl_eval_format(tmp_path):
    """As in DSVL's eval_comprehensive.json: rounds with several images, rounds without."""
    data = {"zoo": [["Compare them.", "./img/z1.png ./img/z2.png"], ["Why?"]], "one": [["Describe.", "a.jpg"]]}
    tests = evaluate.read_eval_data(write_json(tmp_path / "e.json", data))
    assert list(tests) == ["zoo", "one"]
    first, second = tests["zoo"]
    assert first.image_paths == ["./img/z1.png", "./img/z2.png"]  # split on ' ', each stripped
    assert first.last_field == "./img/z1.png ./img/z2.png"
    assert second.image_paths == [] and second.last_field == "Why?"  # DSVL's image_path column


@pytest.mark.parametrize("data,message", [
    ([["q", "a.png"]], "an object of test name -> rounds"),
    ({}, "an object of test name -> rounds"),
    ({"t": []}, "non-empty list of rounds"),
    ({"t": [["q", "a.png", "extra"]]}, "round 1 must be [question]"),
    ({"t": [["q"], [3]]}, "round 2 must be [question]"),
    ({"t": [["q", "a.png  b.png"]]}, "empty image path"),  # DSVL would open '' and fail
    ({"t": [["q", "a.png "]]}, "empty image path"),
])
def test_malformed_eval_data_is_one_line(tmp_path, data, message):
    with pytest.raises(UserError, match=message.replace("[", r"\[")) as err:
        evaluate.read_eval_data(write_json(tmp_path / "e.json", data))
    assert "\n" not in str(err.value)


def test_unreadable_eval_data(tmp_path):
    with pytest.raises(UserError, match="cannot read"):
        evaluate.read_eval_data(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UserError, match="is not a JSON file"):
        evaluate.read_eval_data(tmp_path / "bad.json")


def test_missing_images_are_named_before_any_answer(tmp_path):
    from PIL import Image

    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    found = evaluate.read_eval_data(write_json(tmp_path / "f.json", {"t": [["q", "a.png"], ["q"]]}))
    evaluate.check_images(found, tmp_path)
    tests = evaluate.read_eval_data(write_json(tmp_path / "e.json", {"t": [["q", "a.png b.png"], ["q", "c.png"]]}))
    with pytest.raises(UserError, match=r"2 image file\(s\) not found under .*: b.png, c.png; pass --image-root"):
        evaluate.check_images(tests, tmp_path)


def test_broken_images_are_named_before_any_answer(tmp_path):
    from PIL import Image

    Image.new("RGB", (4, 4)).save(tmp_path / "good.png")
    (tmp_path / "text.png").write_text("not an image")
    tests = evaluate.read_eval_data(write_json(tmp_path / "e.json", {"t": [["q", "good.png"], ["q", "text.png"]]}))
    with pytest.raises(UserError, match=r"1 file\(s\) under .* are not images Pillow can open: text.png$"):
        evaluate.check_images(tests, tmp_path)


def test_unknown_test_names_fail_before_the_model_opens(tmp_path, capsys):
    data = write_json(tmp_path / "e.json", {"t": [["q"]]})
    argv = ["--artifacts", str(tmp_path / "nowhere"), "--eval-data", str(data), "--output",
            str(tmp_path / "out.csv"), "--tests", "t", "nope"]
    assert exit_status(lambda: evaluate.main(argv)) == 2
    assert capsys.readouterr().err.strip() == f"error: no test named 'nope' in {data}"
    assert not (tmp_path / "out.csv").exists()


def test_csv_is_batch_generations_and_written_whole(tmp_path):
    rows = [evaluate.CSV_HEADER, ["t", "a.png", "q, with a comma", "line one\nline two \"quoted\""]]
    out = tmp_path / "r.csv"
    evaluate.write_csv(rows, out)
    raw = out.read_bytes()
    assert raw.startswith(b"test_name,image_path,question,answer\r\n")  # csv's default dialect
    with open(out, newline="", encoding="utf-8") as file:
        assert list(csv.reader(file)) == rows
    assert [p.name for p in tmp_path.iterdir()] == ["r.csv"]
    with pytest.raises(UserError, match="cannot write"):
        evaluate.write_csv(rows, tmp_path / "no-such-dir" / "r.csv")
    assert [p.name for p in tmp_path.iterdir()] == ["r.csv"]


def test_unwritable_output_fails_before_the_model_opens(tmp_path, capsys):
    """Found by scripts/fuzz_cli.py: an --output under a file was only found after the last
    answer, and then as a traceback."""
    data = write_json(tmp_path / "e.json", {"t": [["q"]]})
    (tmp_path / "a-file").write_text("x")
    for output, message in [(tmp_path / "a-file" / "out.csv", "is not a directory"),
                            (tmp_path, "is a directory: give a file name")]:
        argv = ["--artifacts", str(tmp_path / "nowhere"), "--eval-data", str(data), "--output", str(output)]
        assert exit_status(lambda argv=argv: evaluate.main(argv)) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: --output") and message in err and err.count("\n") == 1
    with pytest.raises(UserError, match="cannot write"):
        evaluate.write_csv([evaluate.CSV_HEADER], tmp_path / "a-file" / "out.csv")


def test_compare_reports_each_difference():
    header = evaluate.CSV_HEADER
    ours = [header, ["a", "x.png", "q1", "The cat sits."], ["a", "q2", "q2", "Yes."], ["b", "y.png", "q", "Hi"]]
    assert evaluate.compare(ours, ours) == ["3 of 3 answers identical to the reference"]
    theirs = [header, ["a", "x.png", "q1", "The cat sat."], ["a", "q2", "other", "Yes."], ["c", "z.png", "q", "Hi"]]
    assert evaluate.compare(ours, theirs) == [
        "a round 1: answers differ from character 9 of 12: 'its.' here, 'at.' there",
        "a round 2: the questions differ ('q2' here, 'other' there)",
        "b round 1: only in ours",
        "c round 1: only in the reference",
        "0 of 4 answers identical to the reference"]
    prefix = [header, ["a", "x.png", "q1", "The cat sits. More."]]
    assert evaluate.compare(prefix, ours[:2])[0] == "a round 1: answers differ from character 13 of 13: ' More.' here, '' there"


def test_reference_csv_is_checked(tmp_path):
    (tmp_path / "r.csv").write_text("a,b\n1,2\n")
    with pytest.raises(UserError, match="header should read test_name,image_path,question,answer"):
        evaluate.read_csv(tmp_path / "r.csv")
    (tmp_path / "r.csv").write_text("test_name,image_path,question,answer\nt,x,q\n")
    with pytest.raises(UserError, match="every row needs 4 fields"):
        evaluate.read_csv(tmp_path / "r.csv")
    with pytest.raises(UserError, match="cannot read"):
        evaluate.read_csv(tmp_path / "missing.csv")


def test_ctrl_c_stops_the_run_not_just_the_answer(monkeypatch):
    """Chat.ask turns Ctrl-C into an "interrupted" answer and carries on (right for a chat);
    an evaluation must stop instead of writing a cut answer into the CSV."""
    from types import SimpleNamespace

    class Chat:
        def ask(self, *args):
            return SimpleNamespace(stop_reason="interrupted", tokens=[1], text="cut",
                                   timings={"total_s": 0.0})

    pipe = SimpleNamespace(chat=lambda *a, **k: Chat(),
                           artifacts=SimpleNamespace(preprocessor=SimpleNamespace(check_size=None)))
    monkeypatch.setattr(evaluate, "sampling_options", lambda args, pipe: None)
    args = SimpleNamespace(allow_special_tokens=False, image_root=Path("."))
    with pytest.raises(KeyboardInterrupt):
        evaluate.evaluate(args, pipe, {"t": [evaluate.Round("q", [], "q")]})


def test_help_explains_the_inputs():
    proc = subprocess.run([sys.executable, "-m", "runtime.evaluate", "--help"], cwd=REPO,
                          capture_output=True, text=True, check=True)
    for flag in ("--eval-data", "--image-root", "--output", "--tests", "--compare", "--max-new-tokens"):
        assert flag in proc.stdout
    assert "batch_generation.py" in proc.stdout
