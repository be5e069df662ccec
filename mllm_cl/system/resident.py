"""Lightning strategies under which the model stays on its device for the whole run.

The loop fits every phase with a fresh Trainer. Lightning's strategies end each
fit by moving the LightningModule (and the optimizer's state) to the CPU, and
``DDPStrategy`` wraps the module in a new ``DistributedDataParallel`` every
time, which broadcasts every parameter from rank 0. At 7B that is 13 GiB each
way per rank per phase, and 7B parameters on the wire per phase. Here:

- ``teardown`` leaves the module where it is (the Trainer's optimizer is dropped
  with the Trainer, so its state is not copied anywhere either);
- the first DDP wrap of a process broadcasts everything, as DDP does; later wraps
  broadcast only the parameters the phase trains (``requires_grad``): frozen ones
  never changed since, on any rank;
- buffers are not broadcast on every forward (``broadcast_buffers=False``): every
  method's buffers are either deterministic (rotary tables) or computed from
  statistics summed or gathered over all processes, so they agree already;
- ``find_unused_parameters`` only for methods that can leave a trainable parameter
  out of a step's backward (``Method.unused_parameters``).
"""

from __future__ import annotations

import torch
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy


class _StaysOnDevice:
    """``teardown`` without Lightning's move of the module and the optimizer's state to the CPU."""

    def teardown(self) -> None:
        module = self.lightning_module
        self.optimizers = []  # dropped with this Trainer; not copied to the CPU first
        if module is None:
            return super().teardown()
        module.cpu = lambda: module  # the base teardown's move to the CPU becomes a no-op
        try:
            super().teardown()
        finally:
            del module.cpu


class ResidentSingleDevice(_StaysOnDevice, SingleDeviceStrategy):
    """One device; the module stays there after ``fit``."""


class ResidentDDP(_StaysOnDevice, DDPStrategy):
    """DDP that leaves the module on its device after ``fit`` and broadcasts only what a phase trains.

    Args:
        sync_frozen: broadcast frozen parameters too when wrapping (the first wrap of a process:
            each process loaded the base itself, rank 0's copy makes them agree bit for bit).
        unused_parameters: DDP's ``find_unused_parameters``.
    """

    def __init__(self, *, sync_frozen: bool, unused_parameters: bool, **kwargs) -> None:
        super().__init__(find_unused_parameters=unused_parameters, broadcast_buffers=False, **kwargs)
        self.sync_frozen = sync_frozen

    def _setup_model(self, model: torch.nn.Module):
        frozen = [] if self.sync_frozen else [n for n, p in model.named_parameters() if not p.requires_grad]
        model._ddp_params_and_buffers_to_ignore = frozen  # read once, by DistributedDataParallel.__init__
        try:
            return super()._setup_model(model)
        finally:
            del model._ddp_params_and_buffers_to_ignore


def phase_strategy(first, *, unused_parameters: bool, wrapped_before: bool):
    """The strategy of a phase's Trainer, of the same kind as ``first``'s (the run's first Trainer,
    built from the configuration): single device or DDP. ``None``: keep the configured one."""
    strategy = first.strategy
    if isinstance(strategy, DDPStrategy):  # the configured DDP's own settings carried over (backend, timeout, ...)
        kwargs = {k: v for k, v in strategy._ddp_kwargs.items()
                  if k not in ("find_unused_parameters", "broadcast_buffers")}
        return ResidentDDP(sync_frozen=not wrapped_before, unused_parameters=unused_parameters,
                           process_group_backend=strategy._process_group_backend, timeout=strategy._timeout, **kwargs)
    if isinstance(strategy, SingleDeviceStrategy):
        return ResidentSingleDevice(device=strategy.root_device)
    return None
