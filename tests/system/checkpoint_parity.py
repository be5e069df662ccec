"""A callback that checks activation checkpointing inside a real fit (selected by class_path in a test).

On the first batch of every phase it computes the loss and every trainable gradient twice, with
checkpointing off and on, on the phase's own batch and method state; on the last task's last phase it also
checks a batch mixing two tasks and, for a routed method fitted with ``route_by: task_id``, the
oracle's routing under a backward.
"""

import lightning as L
import torch

from mllm_cl.data.collate import batch_to
from mllm_cl.experts import checkpoint_contexts

#: (phase, case, loss off, loss on, worst relative gradient difference, gradients compared)
RESULTS: list[tuple] = []


def loss_and_grads(module, batch, *, checkpointing: bool, training: bool = True):
    module.model.set_checkpointing(checkpointing, context_fn=checkpoint_contexts(module.model))
    params = {n: p for n, p in module.named_parameters() if p.requires_grad}
    kept = {n: p.grad for n, p in params.items()}
    for p in params.values():
        p.grad = None
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            loss, extra = module.forward_batch(batch, training=training)
            total = loss if extra is None else loss + extra
            total.backward()
        return total.detach(), {n: p.grad.clone() for n, p in params.items() if p.grad is not None}
    finally:
        for n, p in params.items():
            p.grad = kept[n]
        module.model.set_checkpointing(module.gradient_checkpointing, context_fn=checkpoint_contexts(module.model))


def compare(module, batch, phase: str, case: str, *, training: bool = True) -> None:
    off, g_off = loss_and_grads(module, batch, checkpointing=False, training=training)
    on, g_on = loss_and_grads(module, batch, checkpointing=True, training=training)
    assert g_off.keys() == g_on.keys(), (phase, case, sorted(set(g_off) ^ set(g_on)))
    worst = max([float((g_on[n] - g_off[n]).abs().max() / g_off[n].abs().max().clamp(min=1e-12)) for n in g_off],
                default=0.0)
    RESULTS.append((phase, case, float(off), float(on), worst, len(g_off)))


class GradientParity(L.Callback):
    def __init__(self) -> None:
        self.seen: set[str] = set()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        phase = pl_module.log_prefix
        if phase in self.seen or batch.get("empty"):
            return
        self.seen.add(phase)
        compare(pl_module, batch, phase, "phase batch")
        dm, method = trainer.datamodule, pl_module.method
        last = method.phases(dm.num_tasks - 1, dm.num_tasks)[-1].name
        if not (phase.startswith(f"task{dm.num_tasks}_") and phase.endswith(f"/{last}")):
            return
        mixed = dm.train_collate([dm.train_dataset(t)[i] for t in range(dm.num_tasks) for i in range(2)])
        mixed = batch_to(mixed, pl_module.device)
        compare(pl_module, mixed, phase, "tasks mixed")
        if getattr(method, "route_by", None) == "task_id":  # the oracle's per-sample routing, under a backward
            compare(pl_module, mixed, phase, "oracle routing", training=False)
