"""Generated sections of a results page: replaced in place, appended when missing, the rest kept."""

import datetime

import pytest

from mllm_cl.report.results_page import provenance, replace_section, write_section


def test_a_section_is_replaced_in_place_and_the_rest_of_the_page_kept(tmp_path):
    page = tmp_path / "results.md"
    write_section(page, "comparison", "first")
    page.write_text("# Measurements\n\nby hand\n\n" + page.read_text() + "\n## Later\n\nmore by hand\n")
    write_section(page, "comparison", "second")
    write_section(page, "ablations", "rows")
    text = page.read_text()
    assert "first" not in text and text.count("second") == 1
    assert text.index("by hand") < text.index("second") < text.index("more by hand") < text.index("rows")
    assert text.count("<!-- generated: comparison -->") == 1 and text.count("<!-- end generated: comparison -->") == 1


def test_a_section_with_one_marker_is_refused():
    with pytest.raises(ValueError, match="one of its two markers"):
        replace_section("<!-- generated: comparison -->\nold\n", "comparison", "new")


def test_the_header_names_command_commit_date_machine_and_versions():
    env = {"python": "3.12.3", "packages": {"torch": "2.14.1", "transformers": "5.25.0", "lightning": None},
           "cpu": "AMD EPYC", "threads": 2, "code": {"commit": "0123456789abcdef", "dirty": True}}
    line = provenance("make compare", env, date=datetime.date(2026, 12, 7))
    assert line.startswith("`make compare` · commit 0123456 (uncommitted changes) · 2026-12-07 · AMD EPYC (")
    assert line.endswith("Python 3.12.3, torch 2.14.1, transformers 5.25.0")
    gpu = {**env, "cuda": {"device_name": "NVIDIA H100 80GB HBM3"},
           "code": {"commit": None, "note": "not a git checkout"}}
    assert (" · not a git checkout · 2026-12-07 · NVIDIA H100 80GB HBM3 · "
            in provenance("x", gpu, datetime.date(2026, 12, 7)))
