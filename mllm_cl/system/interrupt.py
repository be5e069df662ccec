"""Ctrl-C during a run: say where it stopped and how to go on.

Lightning catches a KeyboardInterrupt inside ``Trainer.fit``, shuts the fit
down and then calls ``sys.exit(1)``, which would end the process with status 1
and no word about the run. ``fit_phase`` turns that exit back into a
KeyboardInterrupt; the loop knows the task and phase it was in and raises
``Interrupted``, whose message the ``mllm-cl`` command prints before exiting
with status 130 (128 + SIGINT, what a shell reports for Ctrl-C).

Nothing needs saving at that point: a run resumes from the last task
checkpoint, written atomically after each task, or from the last checkpoint
within the task (``checkpoint_every_n_steps``, ``in_task.py``).
"""

from __future__ import annotations


class Interrupted(KeyboardInterrupt):
    """A KeyboardInterrupt whose message says where the run stopped and how to resume it."""


def interrupted_message(task: int | None, activity: str, done: int, within: tuple[str, int] | None = None) -> str:
    """``task``: 1-based task number being trained or evaluated (``None`` before the first task);
    ``activity``: what it was doing (``phase expert``, ``evaluation``, ...); ``done``: tasks finished;
    ``within``: (phase, optimizer step) of the last checkpoint taken within task ``done + 1``, if any."""
    where = f"task {task} ({activity})" if task is not None else activity
    resume = f"resume after task {done}" if done else "resume (no task was finished: it starts with task 1)"
    if within is not None:
        resume = f"resume in task {done + 1} (phase {within[0]}) after step {within[1]}"
    return f"interrupted during {where}; rerun the same command to {resume}"


def fit_phase(trainer, module, datamodule) -> None:
    """``trainer.fit`` with Ctrl-C kept a KeyboardInterrupt (Lightning exits with status 1 instead)."""
    try:
        trainer.fit(module, datamodule=datamodule)
    except SystemExit as e:
        if trainer.interrupted and e.code == 1:
            raise KeyboardInterrupt from None
        raise
