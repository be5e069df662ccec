"""Which progress bar a phase's Trainer gets."""

from lightning.pytorch.callbacks import LearningRateMonitor, RichProgressBar, TQDMProgressBar

from mllm_cl.system.progress import PhaseProgressBar, with_phase_progress


def test_lightnings_default_bar_is_replaced_by_the_phase_bar():
    other, default = LearningRateMonitor(), RichProgressBar()  # Lightning added the bar: the config named none
    got = with_phase_progress([other, default], {"enable_progress_bar": True})
    assert got[0] is other and isinstance(got[1], PhaseProgressBar) and len(got) == 2
    assert isinstance(with_phase_progress([other], {})[1], PhaseProgressBar)  # unset means on, as in Lightning


def test_a_configured_bar_stays_and_switched_off_means_none():
    mine = TQDMProgressBar(refresh_rate=5)
    assert with_phase_progress([mine], {"enable_progress_bar": True}, configured=[mine]) == [mine]
    assert with_phase_progress([RichProgressBar()], {"enable_progress_bar": False}) == []
