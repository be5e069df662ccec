"""The console: progress lines on a terminal and in a log; third-party lines silenced by message and module only."""

import io
import logging
import warnings

import pytest

from mllm_cl.console import ProgressLine, duration, quiet_third_party


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_in_a_log_a_line_every_interval_and_the_summary():
    out = io.StringIO()
    line = ProgressLine(stream=out, interval=0.0, final_line=True)
    line.update("step 1/3")
    line.update("step 2/3")
    line.close("step 3/3 done")
    assert out.getvalue().splitlines() == ["step 1/3", "step 2/3", "step 3/3 done"]


def test_in_a_log_nothing_before_the_interval():
    out = io.StringIO()
    line = ProgressLine(stream=out, interval=3600.0)  # evaluation: no summary line of its own
    for k in range(5):
        line.update(f"batch {k}")
    line.close("5 batches")
    assert out.getvalue() == ""
    phase = ProgressLine(stream=out, interval=3600.0, final_line=True)  # training: the phase's last line
    phase.update("step 1/2")
    phase.close("step 2/2 · loss 0.5")
    assert out.getvalue() == "step 2/2 · loss 0.5\n"


def test_the_last_line_is_not_printed_twice():
    out = io.StringIO()
    line = ProgressLine(stream=out, interval=0.0, final_line=True)
    line.update("step 3/3")
    line.close("step 3/3")
    assert out.getvalue() == "step 3/3\n"


def test_on_a_terminal_the_line_is_redrawn_in_place():
    out = Terminal()
    line = ProgressLine(stream=out, final_line=True)
    line.update("step 1/30 · loss 2.31", force=True)
    line.update("step 2/30", force=True)  # shorter: the rest of the old text is blanked
    line.close("step 30/30")
    text = out.getvalue()
    assert text.startswith("\rstep 1/30 · loss 2.31\rstep 2/30" + " " * 12) and text.endswith("\rstep 30/30\n")
    assert text.count("\n") == 1
    out = Terminal()
    line = ProgressLine(stream=out)  # evaluation: erased when done
    line.update("batch 1/2", force=True)
    line.close("done")
    assert out.getvalue() == "\rbatch 1/2\r         \r"


def test_a_disabled_line_prints_nothing():
    out = io.StringIO()
    line = ProgressLine(stream=out, interval=0.0, final_line=True, enabled=False)
    line.update("x")
    line.close("y")
    assert out.getvalue() == ""


def test_duration():
    assert [duration(s) for s in (0.4, 42, 185, 3720)] == ["0s", "42s", "3m05s", "1h02m"]


@pytest.fixture
def restore_transformers_bars():
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    yield
    (hf_logging.enable_progress_bar if was else hf_logging.disable_progress_bar)()


def test_quiet_third_party_silences_only_what_it_names(caplog, restore_transformers_bars):
    from lightning.pytorch.utilities._pytree import _tree_flatten
    from lightning.pytorch.utilities.rank_zero import rank_zero_info
    from transformers.utils import logging as hf_logging

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_third_party()
        _tree_flatten(1)  # Lightning builds a LeafSpec: torch's FutureWarning, inside lightning's module
        warnings.warn("a FutureWarning of ours", FutureWarning, stacklevel=1)
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, from elsewhere", FutureWarning, stacklevel=1)
    messages = [str(w.message) for w in caught]
    assert messages == ["a FutureWarning of ours", "`isinstance(treespec, LeafSpec)` is deprecated, from elsewhere"]

    caplog.set_level(logging.INFO, logger="lightning.pytorch.utilities.rank_zero")
    rank_zero_info("GPU available: False, used: False")
    rank_zero_info("TPU available: False, using: 0 TPU cores")
    rank_zero_info("💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger](...)")
    rank_zero_info("Something a user should read")
    assert [r.getMessage() for r in caplog.records] == ["Something a user should read"]
    assert not hf_logging.is_progress_bar_enabled()  # the weight-loading bars
