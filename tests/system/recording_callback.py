"""A continual callback that records the hooks it sees (selected by class_path in a test)."""

from mllm_cl.callbacks import ContinualCallback

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


UNUSED: dict[str, set] = {}


class GradientCoverage(ContinualCallback):
    """Per phase: the trainable parameters some backward left without a gradient."""

    def __init__(self):
        self.phase = None

    def on_phase_start(self, module, task, phase):
        self.phase = f"task{task}/{phase.name}"

    def on_after_backward(self, trainer, pl_module):
        missing = {n for n, p in pl_module.named_parameters() if p.requires_grad and p.grad is None}
        UNUSED.setdefault(self.phase, set()).update(missing)


class BroadcastMeter(ContinualCallback):
    """Bytes that DDP's wrap broadcasts from rank 0 in each fit (a line of JSON per fit and rank, appended
    to the file named by ``MLLM_CL_TEST_BROADCASTS``), beside the bytes of the parameters then trainable
    and of all parameters."""

    def setup(self, trainer, pl_module, stage):
        import torch.distributed as dist

        self.sent, self.original = 0, dist._broadcast_coalesced

        def counting(group, tensors, *args, **kwargs):
            self.sent += sum(t.numel() * t.element_size() for t in tensors)
            return self.original(group, tensors, *args, **kwargs)

        dist._broadcast_coalesced = counting

    def teardown(self, trainer, pl_module, stage):
        import json
        import os

        import torch.distributed as dist

        dist._broadcast_coalesced = self.original
        size = lambda ps: sum(p.numel() * p.element_size() for p in ps)  # noqa: E731
        params = list(pl_module.parameters())
        line = {"rank": trainer.global_rank, "sent": self.sent, "all": size(params),
                "trainable": size(p for p in params if p.requires_grad)}
        with open(os.environ["MLLM_CL_TEST_BROADCASTS"], "a") as f:
            f.write(json.dumps(line) + "\n")
