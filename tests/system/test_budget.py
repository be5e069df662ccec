"""Task budgets in steps or epochs, per-task overrides, samples per step and the learning-rate schedule."""

import math
from pathlib import Path

import pytest

from mllm_cl.fit import main as fit_main
from mllm_cl.methods.base import Phase
from mllm_cl.system.budget import Budget
from mllm_cl.system.schedule import PhaseSchedule

ROOT = Path(__file__).resolve().parents[2]
NAMES = ["colour", "mood", "hue"]
SAMPLES = {0: 37, 1: 80, 2: 10}  # training samples per task


def _budget(**kwargs) -> Budget:
    options = dict(steps_per_task=None, epochs_per_task=1, task_budgets=None, samples_per_step=None, lr=0.1,
                   schedule="constant", min_lr_ratio=0.0, warmup_steps=0, warmup_ratio=0.0, max_phase_steps=None)
    return Budget(**{**options, **kwargs})


def _plan(budget, phases, task=0, *, batch=8, world=1, configured=1):
    def batches(tasks, fraction):  # per process: ceil(ceil(n / world) / batch), as the loaders draw them
        n = sum(round(SAMPLES[i] * fraction) for i in tasks)
        return math.ceil(math.ceil(n / world) / batch)

    return budget.plan_task(task, phases, NAMES, batches, batch_size=batch, world_size=world,
                            configured_accumulation=configured)


def test_an_epoch_is_a_pass_over_the_task_in_optimizer_steps():
    (plan,) = _plan(_budget(), [Phase()])
    assert (plan.steps, plan.accumulation, plan.samples_per_step, plan.batches_per_epoch) == (5, 1, 8, 5)  # 37 / 8
    (plan,) = _plan(_budget(epochs_per_task=2), [Phase()])
    assert plan.steps == 10
    (plan,) = _plan(_budget(epochs_per_task=0.5), [Phase()])
    assert plan.steps == 3  # half of 5, rounded half up
    (plan,) = _plan(_budget(samples_per_step=16), [Phase()])  # 2 micro-batches a step: ceil(5 / 2)
    assert (plan.steps, plan.accumulation, plan.samples_per_step) == (3, 2, 16)
    (plan,) = _plan(_budget(steps_per_task=7, epochs_per_task=None), [Phase()])
    assert plan.steps == 7


def test_samples_per_step_mean_the_same_on_one_process_and_on_eight():
    one = _plan(_budget(samples_per_step=128), [Phase()], task=1, batch=16, world=1)[0]
    eight = _plan(_budget(samples_per_step=128), [Phase()], task=1, batch=16, world=8)[0]
    assert ((one.accumulation, one.samples_per_step) == (8, 128)
            and (eight.accumulation, eight.samples_per_step) == (1, 128))
    assert one.steps == eight.steps == 1  # 80 samples: one step of 128 on either
    # The configured accumulation applies where nothing sets samples per step.
    assert _plan(_budget(), [Phase()], configured=4)[0].accumulation == 4


def test_per_task_overrides_by_name():
    budget = _budget(task_budgets={"mood": {"steps": 40}, "hue": {"epochs": 3}})
    assert [_plan(budget, [Phase()], task=t)[0].steps for t in range(3)] == [5, 40, 6]  # 37/8; 40; 3 x 10/8
    with pytest.raises(ValueError, match=r"not in the sequence: \['moood'\]"):
        _budget(task_budgets={"moood": {"steps": 4}}).check_tasks(NAMES)
    with pytest.raises(ValueError, match="model.task_budgets.mood: give exactly one of steps and epochs"):
        _budget(task_budgets={"mood": {"steps": 4, "epochs": 1}})
    with pytest.raises(ValueError, match=r"model.task_budgets.mood: give \{steps: N\} or \{epochs: X\}"):
        _budget(task_budgets={"mood": {"step": 4}})


def test_exactly_one_of_steps_and_epochs_per_task():
    for steps, epochs in ((100, 1), (None, None)):
        with pytest.raises(ValueError, match="model.steps_per_task / model.epochs_per_task: give exactly one"):
            _budget(steps_per_task=steps, epochs_per_task=epochs)
    with pytest.raises(ValueError, match="epochs must be a number > 0"):
        _budget(epochs_per_task=0)
    with pytest.raises(ValueError, match="give at most one"):
        _budget(warmup_steps=3, warmup_ratio=0.1)
    with pytest.raises(ValueError, match="model.schedule: unknown schedule 'linear'"):
        _budget(schedule="linear")


def test_phases_own_steps_shares_joint_phases_and_the_cap():
    budget = _budget(epochs_per_task=2)
    gate, expert = _plan(budget, [Phase("gate", steps=4), Phase("expert")])
    assert (gate.steps, expert.steps) == (4, 10)
    warm, stable = _plan(budget, [Phase("warmup", share=0.05), Phase("stable", share=0.95)])
    assert (warm.steps, stable.steps) == (1, 10)  # 5% of 10 is at least 1; 95% of 10 rounds up to 10
    (joint,) = _plan(budget, [Phase("joint", tasks=[0, 1, 2])], task=2)
    assert joint.steps == 10 + 20 + 4  # the sum of the tasks' own budgets: 2 x (5 + 10 + 2)
    (probe,) = _plan(budget, [Phase("probe", fraction=0.5)], task=1)
    assert probe.steps == 10  # 2 epochs of the phase's 40 samples
    (capped,) = _plan(_budget(epochs_per_task=2, max_phase_steps=3), [Phase()])
    assert capped.steps == 3 and "capped by model.max_phase_steps" in capped.rule


def test_the_cosine_schedule_by_hand():
    s = PhaseSchedule(lr=0.1, total=10, warmup=2, schedule="cosine", floor=0.1)
    # warm-up: (s + 1) / 2; then 0.1 + 0.9 * (1 + cos(pi * (s - 2) / 8)) / 2
    expected = [0.5, 1.0, 1.0, 0.965746, 0.868198, 0.722208, 0.55, 0.377792, 0.231802, 0.134254]
    assert [round(s.factor(k), 6) for k in range(10)] == expected
    constant = PhaseSchedule(lr=0.1, total=10, warmup=4)
    assert [constant.factor(k) for k in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_share_phases_run_one_schedule_over_the_task():
    budget = _budget(epochs_per_task=4, schedule="cosine", warmup_ratio=0.1)
    warm, stable = _plan(budget, [Phase("warmup", share=0.25), Phase("stable", share=0.75)])  # 20 steps: 5 + 15
    assert (warm.steps, stable.steps) == (5, 15)
    assert warm.schedule.total == stable.schedule.total == 20 and warm.schedule.warmup == stable.schedule.warmup == 2
    assert (warm.schedule.offset, stable.schedule.offset) == (0, 5)
    whole = PhaseSchedule(lr=0.1, total=20, warmup=2, schedule="cosine")
    assert [stable.schedule.factor(k) for k in range(15)] == [whole.factor(5 + k) for k in range(15)]
    # A phase with its own schedule and warm-up (routing's gate phase) keeps them.
    (gate,) = _plan(budget, [Phase("gate", steps=10, lr=0.5, warmup=0.3, schedule="constant")])
    assert (gate.schedule.lr, gate.schedule.warmup, gate.schedule.schedule) == (0.5, 3, "constant")


def test_a_run_trains_epochs_with_overrides_and_the_cosine_schedule(make_bench, tmp_path):
    """A real fit: 37 samples at batch 8 are 5 steps an epoch; the second task gets 2 epochs by name;
    the learning rate of every optimizer step is the hand-computed cosine."""
    import recording_callback

    (tmp_path / "bench").mkdir()
    bench = make_bench(tmp_path / "bench", {"red": (210, 30, 30), "blue": (30, 40, 210)}, train=37, test=2)
    recording_callback.OPTIM.clear()
    fit_main(["--config", str(ROOT / "configs/micro.yaml"), "--config", str(ROOT / "configs/methods/lora_ft.yaml"),
              "--data.benchmark", str(bench), "--trainer.default_root_dir", str(tmp_path / "run"),
              "--data.train_limit", "null", "--data.batch_size", "8", "--model.steps_per_task", "null",
              "--model.epochs_per_task", "1", "--model.task_budgets", "{mood: {epochs: 2}}",
              "--model.schedule", "cosine", "--model.warmup_ratio", "0.2", "--model.min_lr_ratio", "0.1",
              "--trainer.callbacks+", "recording_callback.OptimizerRecorder"])
    steps = recording_callback.OPTIM
    assert len(steps) == 5 + 10 and all(s["batches"] == 1 for s in steps)
    for first, total in ((0, 5), (5, 10)):
        warmup = round(0.2 * total)
        expected = [0.003 * ((k + 1) / warmup if k < warmup else
                             0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (k - warmup) / (total - warmup))))
                    for k in range(total)]
        assert [s["lr"] for s in steps[first:first + total]] == pytest.approx(expected, rel=1e-9)
    # The run's config.yaml keeps the null steps_per_task: the run reads back as it was trained.
    from mllm_cl.system.restore import restore

    restored = restore(tmp_path / "run", 2)
    assert (restored.module.budget.default.steps, restored.module.budget.default.epochs) == (None, 1.0)
    assert restored.module.budget.task("mood").epochs == 2
