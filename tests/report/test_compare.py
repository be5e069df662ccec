"""examples/compare_methods: sweeps over orders and seeds through the real CLI, one table with the spread."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def experiments(general_bench, tmp_path_factory):
    """Two micro sequences on the bench, standing in for shapes and coin: --experiment options for run.py."""
    folder = tmp_path_factory.mktemp("experiments")
    micro = yaml.safe_load((ROOT / "configs/micro.yaml").read_text())
    options = []
    for name, order, general in (("shapes", ["colour", "mood"], []), ("coin", ["mood", "colour"], ["hue"])):
        config = {**micro, "experiment": f"micro_{name}",
                  "data": {**micro["data"], "benchmark": str(general_bench), "order": order, "general": general,
                           "general_scorers": ["exact_match", "token_f1"]}}
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(config))
        options += ["--experiment", f"{name}={folder / name}.yaml"]
    return options


def _script(name, *args):
    """examples/compare_methods/NAME with these arguments, in its own process."""
    return subprocess.run([sys.executable, f"examples/compare_methods/{name}", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=900, check=False,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


def _sweep(experiments, runs, *args, methods=("zero_shot", "lora_ft")):
    out = _script("run.py", *experiments, "--methods", *methods, "--runs", str(runs), *args)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def _sections(table: Path) -> dict[str, dict[str, list[str]]]:
    """comparison.md: sequence -> method -> its row's cells."""
    out, section = {}, None
    for line in table.read_text().splitlines():
        if line.startswith("## "):
            section = out.setdefault(line[3:].strip(), {})
        elif line.startswith("| ") and not line.startswith("| method"):
            cells = [c.strip() for c in line.split("|")[1:-1]]
            section[cells[0]] = cells
    return out


def _row_names(table: Path) -> list[str]:
    return [line.split("|")[1].strip() for line in table.read_text().splitlines()
            if line.startswith("| ") and not line.startswith("| method")]


def _num(cell: str) -> float:
    return float(cell.split(" ")[0].replace("−", "-"))


HEAD = ["method", "runs", "MFT", "MFN", "gap to oracle", "MAA", "BWT", "routing", "general", "right after",
        "final row", "stored", "time", "ratio"]


@pytest.mark.slow  # three sweeps; the default run keeps the two-sequence test of the same script
def test_two_orders_and_two_seeds_make_one_table_with_the_spread(experiments, tmp_path):
    runs = tmp_path / "compare"
    _sweep(experiments, runs, "--sequence", "shapes", "--order", "colour,mood", "--seed", "0")
    _sweep(experiments, runs, "--sequence", "shapes", "--order", "mood,colour", "--seed", "0")
    out = _sweep(experiments, runs, "--sequence", "shapes", "--order", "colour,mood", "--seed", "1")
    sweeps = sorted(p.name for p in (runs / "shapes").iterdir() if p.is_dir())
    assert sweeps == ["colour-mood-s0", "colour-mood-s1", "mood-colour-s0"]
    order = json.loads((runs / "shapes/mood-colour-s0/lora_ft/results.json").read_text())["order"]
    assert order == ["mood", "colour"]
    rows = _sections(runs / "comparison.md")["shapes"]
    assert set(rows) == {"zero_shot", "lora_ft"} and rows["lora_ft"][1] == "3"
    cells = dict(zip(HEAD, rows["lora_ft"], strict=False))
    assert "(" in cells["MFN"] and "–" in cells["MFN"]  # MFN: mean (min–max) over the three sweeps
    first = json.loads((runs / "shapes/colour-mood-s0/lora_ft/results.json").read_text())["matrix"]
    assert cells["right after"] == f"{first[0][0]:.0f} / {first[1][1]:.0f}"  # right after each task, first sweep
    assert dict(zip(HEAD, rows["zero_shot"], strict=False))["right after"] == "–"  # one row: no diagonal
    assert cells["ratio"].startswith("1.00") and cells["gap to oracle"] == "–"
    for png in ("mfn_vs_params.png", "task_curves.png"):
        with Image.open(runs / "shapes" / png) as im:
            assert im.width > 400
    assert "lora_ft" in out


def test_the_tables_and_figures_become_a_generated_section_of_the_results_page(experiments, tmp_path):
    runs = tmp_path / "compare"
    page = tmp_path / "docs" / "results.md"
    page.parent.mkdir()
    page.write_text("# Measurements\n\nWritten by hand.\n")
    out = _sweep(experiments, runs, "--quick", "--results", str(page))
    assert "wrote the section 'comparison'" in out
    sections = _sections(runs / "comparison.md")
    text = page.read_text()
    assert text.startswith("# Measurements\n\nWritten by hand.\n")  # the rest of the page is kept
    section = text.split("<!-- generated: comparison -->\n", 1)[1].split("<!-- end generated: comparison -->")[0]
    header = section.splitlines()[0]
    assert header.startswith("`python examples/compare_methods/run.py ") and "--quick" in header
    assert " · commit " in header and " · Python " in header and "torch " in header
    assert "as in [metrics](metrics.md)" in section  # a link from the page, plain text in RUNS/comparison.md
    for name in ("shapes", "coin"):  # the same rows as comparison.md, and the figures beside the page
        assert f"### {name}" in section
        for row in sections[name].values():
            assert " | ".join(row) in section
        for png in ("mfn_vs_params.png", "task_curves.png"):
            assert (page.parent / "figures" / f"compare_{name}_{png}").is_file()
            assert f"(figures/compare_{name}_{png})" in section


@pytest.mark.slow  # cram's fits and oracles on both sequences; the section test above covers the script's path
def test_both_sequences_with_oracle_rows_and_the_numbers_of_each_results_json(experiments, tmp_path):
    runs = tmp_path / "compare"
    out = _sweep(experiments, runs, "--quick", methods=("lora_ft", "cram"))
    assert "cram_oracle" in out
    sections = _sections(runs / "comparison.md")
    assert list(sections) == ["shapes", "coin"]
    for name, order in (("shapes", "colour-mood"), ("coin", "mood-colour")):
        rows = sections[name]
        assert list(rows) == ["lora_ft", "cram", "cram_oracle"]
        sweep = runs / name / f"{order}-s0"
        res = {m: json.loads((sweep / m / "results.json").read_text()) for m in rows}
        oracle = res["cram_oracle"]
        assert oracle["reevaluated"]["options"] == ["--model.method.init_args.route_by", "task_id"]
        assert oracle["params"] == res["cram"]["params"]  # the same experts
        for m, r in res.items():
            cells = dict(zip(HEAD, rows[m], strict=False))
            for metric in ("MFT", "MFN", "MAA", "BWT"):
                value = r["metrics"][metric]
                want = "–" if value is None else f"{value:.1f}".replace("-", "−")
                assert cells[metric] == want, (name, m, metric)
            assert cells["stored"] == f"{r['params']['stored_per_task'][-1]['total'] / 1000:.1f}k"
            assert cells["final row"] == " / ".join(f"{v:.0f}" for v in r["matrix"][-1])
        cram = dict(zip(HEAD, rows["cram"], strict=False))
        gap = res["cram"]["metrics"]["MFN"] - oracle["metrics"]["MFN"]
        assert cram["gap to oracle"] == f"{gap:.1f}".replace("-", "−")
        groups = res["cram"]["method_metrics"]["stage_02"]["group_accuracy"]
        assert cram["routing"] == f"group {sum(groups.values()) / len(groups):.0f}"
        assert dict(zip(HEAD, rows["cram_oracle"], strict=False))["routing"] == "true task"
        seconds = lambda r: (r["timings"]["zero_shot_eval_s"]  # noqa: E731
                             + sum(sum(t["phases"].values()) + t["eval_s"] for t in r["timings"]["tasks"]))
        assert cram["ratio"] == f"{seconds(res['cram']) / seconds(res['lora_ft']):.2f}"
        assert (dict(zip(HEAD, rows["cram_oracle"], strict=False))["time"]
                == f"{oracle['reevaluated']['eval_s']:.0f} s (eval)")
        general = dict(zip(HEAD, rows["lora_ft"], strict=False))["general"]
        if name == "coin":  # the sequence with a general task (retention None where the zero-shot score is 0)
            kept = res["lora_ft"]["general"]["retention"]["hue"]["token_f1"]
            assert general == ("–" if kept is None else f"{100 * kept:.0f}%")
        else:
            assert "general" not in res["lora_ft"] and general == "–"
        for png in ("mfn_vs_params.png", "task_curves.png"):
            assert (runs / name / png).is_file()
    again = _sweep(experiments, runs, "--quick", methods=("lora_ft", "cram"))
    assert again.count("done in") == 6  # everything kept: nothing trains


def _ablations(experiments, runs, *only):
    return _script("ablations.py", *experiments[:2], "--only", *only, "--runs", str(runs))


@pytest.mark.slow
def test_ablations_train_or_evaluate_each_row_beside_the_canonical_sweep(experiments, tmp_path):
    runs = tmp_path / "compare"
    _sweep(experiments, runs, "--sequence", "shapes")  # the canonical order (colour, mood), seed 0: no cram yet
    missing = _ablations(experiments, runs, "cram_task_slot")
    assert missing.returncode != 0 and "colour-mood-s0/cram" in missing.stderr and "--methods cram" in missing.stderr
    _sweep(experiments, runs, "--sequence", "shapes", methods=("cram",))
    out = _ablations(experiments, runs, "cram_no_penalty", "individual_attn_r9", "cram_task_slot")
    assert out.returncode == 0, out.stderr[-3000:]
    rows = _row_names(runs / "ablations.md")
    assert rows == ["zero_shot", "lora_ft", "cram", "cram_oracle", "cram_no_penalty", "individual_attn_r9",
                    "cram_task_slot"]  # the sweep's rows first, its oracle beside its method
    cram = yaml.safe_load((runs / "ablations/cram_no_penalty/config.yaml").read_text())["model"]["method"]
    assert cram["class_path"].endswith("CRAM") and cram["init_args"]["orth_weight"] == 0
    individual = yaml.safe_load((runs / "ablations/individual_attn_r9/config.yaml").read_text())["model"]["method"]
    experts = individual["init_args"]["experts"]["init_args"]
    assert experts["rank"] == 9 and experts["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj"]
    slot = json.loads((runs / "ablations/cram_task_slot/results.json").read_text())  # evaluated, not trained
    assert slot["reevaluated"]["from"] == str(runs / "shapes/colour-mood-s0/cram")
    assert slot["reevaluated"]["options"] == ["--model.method.init_args.route_by", "task_slot"]
    _sweep(experiments, runs, "--compare-only")  # the sweeps' table leaves the ablations/ folder out
    assert list(_sections(runs / "comparison.md")["shapes"]) == ["zero_shot", "lora_ft", "cram", "cram_oracle"]
