"""`--data.on_bad_sample skip` on a real micro run: nothing is dropped without being counted and reported."""

import json
from pathlib import Path

from mllm_cl.fit import main as fit_main
from mllm_cl.report.summary import markdown, row, table

ROOT = Path(__file__).resolve().parents[2]
COLOURS = {"red": (210, 30, 30), "blue": (30, 40, 210), "green": (30, 180, 50)}


def _with_bad_rows(root: Path) -> Path:
    """colour's test set gets a corrupt image (found when its batch is made, at every stage);
    mood's training set a record naming a missing image (found when the file is read, once)."""
    (root / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    tests = json.loads((root / "colour_test.json").read_text())
    tests.insert(1, {"question_id": "colour-bad", "image": "images/broken.png", "text": "What colour is it?",
                     "answer": "red"})
    (root / "colour_test.json").write_text(json.dumps(tests))
    train = json.loads((root / "mood_train.json").read_text())
    train.insert(2, {**train[0], "id": "mood-missing", "image": "images/nowhere.png"})
    (root / "mood_train.json").write_text(json.dumps(train))
    return root


def test_skipped_test_rows_are_counted_reported_and_recorded(tmp_path, make_bench, capsys):
    (tmp_path / "bench").mkdir()
    bench = _with_bad_rows(make_bench(tmp_path / "bench", COLOURS, train=12, test=3))
    run = tmp_path / "run"
    fit_main(["--config", str(ROOT / "configs/micro.yaml"), "--config", str(ROOT / "configs/methods/lora_ft.yaml"),
              "--data.benchmark", str(bench), "--trainer.default_root_dir", str(run), "--data.on_bad_sample", "skip"])
    out = capsys.readouterr().out
    results = json.loads((run / "results.json").read_text())

    # Every stage scores colour over the 3 readable rows of 4 and says so; mood lost nothing at test time.
    stages = [line for line in out.splitlines() if line.startswith("mllm-cl: stage ")]
    assert len(stages) == 3
    assert all("colour=" in s and "(over 3 of 4 rows; 1 skipped as bad)" in s for s in stages)
    assert all(s.count("skipped") == 1 for s in stages)  # not mood's
    assert out.count("task colour (stage ") == 3 and "1 x corrupt image" in out
    assert "colour_test.json, record 1: corrupt image" in out
    assert "task mood: skipped 1 bad samples" in out and "1 x missing image" in out  # training, as before
    assert (run / "predictions/stage_02/colour.jsonl").read_text().count("\n") == 3

    bad = results["bad_samples"]
    assert bad["train"] == {"colour": {"skipped": 0, "reasons": {}},
                            "mood": {"skipped": 1, "reasons": {"missing image": 1}}}
    colour = {"scored": 3, "skipped": 1, "reasons": {"corrupt image": 1}}
    mood = {"scored": 3, "skipped": 0, "reasons": {}}
    assert bad["eval"] == {"stage_00": {"colour": colour, "mood": mood}, "stage_01": {"colour": colour},
                           "stage_02": {"colour": colour, "mood": mood}}

    # mllm-cl report: the columns appear for this run (and stay away for a clean one), report.md lists them.
    clean = json.loads(json.dumps(results))
    clean["bad_samples"] = {"train": {}, "eval": {}}
    text = table([row(run, results), row(tmp_path / "clean", clean)])
    header, _, skipped_run, clean_run = text.splitlines()
    assert header.split()[-4:] == ["train", "skipped", "test", "skipped"]
    assert skipped_run.split()[-5:] == ["2/2", "1", "1", "of", "7"]  # the final stage: colour 1 of 4, mood 0 of 3
    assert clean_run.split()[-1] == "2/2"
    assert "train skipped" not in table([row(tmp_path / "clean", clean)])
    report = markdown(run, results)
    assert "## Bad input skipped" in report and "| stage_02 | colour | 1 | 3 | 1 x corrupt image |" in report
    assert "| training | mood | 1 | – | 1 x missing image |" in report
