"""``mllm-cl plan``: what a run will cost, printed before anything trains.

    mllm-cl plan --config configs/experiments/coin_llava15_7b.yaml --config configs/methods/cram.yaml

Takes ``fit``'s options and configs. The backbone is built on the ``meta`` device (from a local
folder only its ``config.json`` is read; no weights, no GPU), the method is injected and its tasks'
hooks replayed (CRAM's and LLaVA-CMoE's data-driven structure at the largest their options allow),
and every task's files are read for the data index. Printed:

- per task: training samples, the budget's rule, each phase's optimizer steps and samples per step,
  the parameters that train, and the test prompts;
- the parameters in all, the method's state after the last task and the checkpoint a task writes;
- the evaluation workload: prompts generated at every stage and in all;
- the estimated peak memory per GPU at ``data.batch_size`` x ``data.max_length`` tokens
  (``mllm_cl.system.memory.peak_bytes``; the bytes a decoder layer keeps per token are its bf16
  input under ``model.gradient_checkpointing``, else the figure measured at LLaVA-1.5-7B's width by
  ``benchmarks/memory.py``, scaled by width). Estimates, until a GPU measures the run.

The processes come from ``trainer.devices`` x ``trainer.num_nodes`` (``--trainer.devices 8``).
"""

from __future__ import annotations

import sys
from types import SimpleNamespace

import torch

from mllm_cl.errors import UserError
from mllm_cl.experts import expert_layers
from mllm_cl.system.build import BuildCLI, build
from mllm_cl.system.memory import largest_structure, peak_bytes

KiB, MiB, GiB = 1024, 1024 ** 2, 1024 ** 3
#: ``benchmarks/memory.py`` at width 4096 / MLP 11008 / vocabulary 32064 (docs/memory.md): what a decoder
#: layer keeps per token without checkpointing (PEFT LoRA's figure; the methods' are within 0.8-1.3x of
#: it), and the output head and loss per token at the supervised positions.
LAYER_BYTES_PER_TOKEN_4096 = 167.7 * KiB
HEAD_BYTES_PER_TOKEN_32064 = 8.8 * KiB


class PlanCLI(BuildCLI):
    """``fit``'s parser and checks; ``fit`` prints the plan instead of training."""

    def _check_run_dir(self, cfg, method_name: str) -> None:
        pass  # a plan writes nothing

    def instantiate_trainer(self, **kwargs):
        self.datamodule.check_files()  # the data index; no Trainer (the configured GPUs may not be here)
        return SimpleNamespace(fit=None)  # what LightningCLI looks up before calling ``self.fit``

    def fit(self, model, datamodule, **_) -> None:
        trainer = self.config["fit"]["trainer"]
        world = _processes(trainer.get("devices"), trainer.get("num_nodes"))
        print(render(model, datamodule, world=world, eval_future_tasks=self.config["fit"]["eval_future_tasks"],
                     accumulation=int(trainer.get("accumulate_grad_batches") or 1)))


def _processes(devices, nodes) -> int:
    if isinstance(devices, (list, tuple)):
        count = len(devices)
    elif isinstance(devices, int) and devices > 0:
        count = devices
    elif isinstance(devices, str) and devices.isdigit():
        count = int(devices)
    else:
        raise UserError(f"mllm-cl plan: trainer.devices is {devices!r}; give the number of GPUs the run will use "
                        "(--trainer.devices 8)")
    return count * int(nodes or 1)


def _n(x: float) -> str:
    return f"{x / 1e9:.3f}B" if x >= 1e9 else f"{x / 1e6:.2f}M" if x >= 1e6 else f"{int(x)}"


def render(module, dm, *, world: int, eval_future_tasks: bool = False, accumulation: int = 1) -> str:
    method, model = module.method, module.model
    names, T = dm.task_names, dm.num_tasks
    budget = module.budget
    budget.check_tasks(names)
    width = model.get_input_embeddings().embedding_dim
    largest_structure(method, model, T - 1, feature_dim=width)
    lines = [f"mllm-cl plan: {method.name} on {T} tasks, {world} process(es) x batch {dm.batch_size}, "
             f"max_length {dm.max_length} (estimates; nothing is loaded or trained)", ""]
    header = f"{'task':>4} {'name':<14} {'train':>8} {'budget':<22} {'phases (steps x samples a step)':<44} " \
             f"{'trains':>8} {'test':>6}"
    lines += [header, "-" * len(header)]
    total_steps, total_samples, peak_trained = 0, 0, 0
    for t in range(T):
        method.on_task_start(model, t)
        phases = method.phases(t, T)

        def batches(tasks: list[int], fraction: float, t: int = t) -> int:
            dm.set_task(t, fraction=fraction, tasks=tasks)
            return dm.batches_per_epoch(world_size=world)

        plans = budget.plan_task(t, phases, names, batches, batch_size=dm.batch_size, world_size=world,
                                 configured_accumulation=accumulation)
        dm.set_task(t)
        trained: dict[str, torch.nn.Parameter] = {}
        for phase in phases:
            method.on_phase_start(model, t, phase)
            trained.update({n: p for n, p in model.named_parameters() if p.requires_grad})
            method.plan_phase_end(model, t, phase)
        method.plan_task_end(model, t)
        trained_bytes = sum(p.numel() * 4 for p in trained.values())  # fp32 experts
        peak_trained = max(peak_trained, trained_bytes)
        steps = sum(p.steps for p in plans)
        total_steps += steps
        total_samples += sum(p.steps * p.samples_per_step for p in plans)
        shown = ", ".join(f"{ph.name} {p.steps} x {p.samples_per_step}" for ph, p in zip(phases, plans, strict=False))
        rule = budget.task(names[t]).describe()
        count = dm.train_count(t)
        lines.append(f"{t + 1:>4} {names[t][:14]:<14} {'shards' if count is None else count:>8} {rule:<22} {shown:<44} "
                     f"{_n(sum(p.numel() for p in trained.values())):>8} {dm.test_count(t):>6}")
    lines.append("")
    params = sum(p.numel() for p in model.parameters())
    adapters = [v for layer in expert_layers(model).values() for k, v in layer.state_dict().items()
                if not k.startswith("base_layer.")]
    _, state = method.state()
    state_bytes = sum(t.numel() * t.element_size() for t in state.values())
    buffers = sum(b.numel() * b.element_size() for layer in expert_layers(model).values() for b in layer.buffers()
                  if not any(b is q for q in layer.base_layer.buffers()))
    checkpoint = sum(v.numel() * v.element_size() for v in adapters) + state_bytes
    base = sum(p.numel() for n, p in model.named_parameters() if _is_base(n))
    lines.append(f"parameters: base {_n(base)}, {_n(params)} with the method's after task {T}; optimizer steps: "
                 f"{total_steps:,} ({total_samples:,} samples)")
    lines.append(f"method state after task {T}: {(state_bytes + buffers) / MiB:.1f} MiB; checkpoint a task writes: "
                 f"{checkpoint / MiB:.1f} MiB")
    lines += _evaluation(method, dm, eval_future_tasks)
    frozen = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if _is_base(n))
    layers = model.config.num_hidden_layers if hasattr(model.config, "num_hidden_layers") else \
        model.config.text_config.num_hidden_layers
    checkpointing = module.gradient_checkpointing
    dtype_bytes = next(model.parameters()).element_size()
    per_layer = dtype_bytes * width if checkpointing else LAYER_BYTES_PER_TOKEN_4096 * width / 4096
    vocab = model.get_input_embeddings().num_embeddings
    tokens = dm.batch_size * dm.max_length
    peak = peak_bytes(base_bytes=frozen, adapter_bytes=checkpoint + buffers, trained_bytes=peak_trained, tokens=tokens,
                      layers=layers, layer_bytes_per_token=per_layer,
                      head_bytes_per_token=HEAD_BYTES_PER_TOKEN_32064 * vocab / 32064)
    lines.append(f"estimated peak memory per GPU: {peak / GiB:.1f} GiB at {dm.batch_size} x {dm.max_length} tokens "
                 f"(activations {tokens * layers * per_layer / GiB:.1f} GiB over {layers} layers, "
                 f"{per_layer / KiB:.1f} KiB a token a layer, gradient checkpointing "
                 f"{'on' if checkpointing else 'off'})")
    return "\n".join(lines)


def _is_base(name: str) -> bool:
    return ".experts." not in name and ".routers." not in name


def _evaluation(method, dm, eval_future_tasks: bool) -> list[str]:
    """Prompts generated at each stage: the zero-shot row, then after every task (``evaluate_stage``)."""
    T = dm.num_tasks
    test = [dm.test_count(i) for i in range(T)]
    general = sum(dm.test_count(-1 - j) for j in range(len(dm.general_tasks)))
    stages = [sum(test) + general]
    for t in range(T):
        if method.one_row and t != T - 1:
            stages.append(0)
            continue
        upto = min(T - 1, t + 1) if eval_future_tasks else t
        stages.append(sum(test[: upto + 1]) + general)
    return [f"evaluation: {sum(stages):,} prompts in all; per stage (0 = zero-shot): "
            + ", ".join(f"{k}: {n:,}" for k, n in enumerate(stages))]


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[2:] if argv is None else argv)
    build([*args, "--model.load_device", "meta"], PlanCLI)
    return 0
