"""A continual callback that records the hooks it sees (selected by class_path in a test)."""

from callbacks import ContinualCallback

CALLS: list[tuple] = []


class Recorder(ContinualCallback):
    def on_task_start(self, module, task):
        CALLS.append(("task_start", id(self), task))

    def on_phase_start(self, module, task, phase):
        CALLS.append(("phase_start", id(self), task, phase.name))

    def on_fit_start(self, trainer, pl_module):
        copies = sum(isinstance(c, Recorder) for c in trainer.callbacks)
        CALLS.append(("fit_start", id(self), id(trainer), copies))

    def on_phase_end(self, module, task, phase):
        CALLS.append(("phase_end", id(self), task, phase.name))

    def on_task_end(self, module, task):
        CALLS.append(("task_end", id(self), task))


OPTIM: list[dict] = []


class OptimizerRecorder(ContinualCallback):
    """Per optimizer step: the phase, the learning rate in use and the micro-batches since the last step."""

    def __init__(self):
        self.phase, self.batches = None, 0

    def on_phase_start(self, module, task, phase):
        self.phase = phase.name

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.batches += 1

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        OPTIM.append({"phase": self.phase, "lr": optimizer.param_groups[0]["lr"], "batches": self.batches + 1,
                      "accumulate": trainer.accumulate_grad_batches})
        self.batches = -1  # the step's own last micro-batch ends after this hook
