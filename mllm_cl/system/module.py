"""ContinualMLLM: the LightningModule one Trainer.fit per phase trains.

It composes the backbone (built from a preset or loaded from a local path)
with the method's expert layers. Only parameters with ``requires_grad`` go to
the optimizer, so frozen experts get neither updates, weight decay nor
optimizer state; a fresh optimizer is built for every phase.
"""

from __future__ import annotations

import os
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException

from mllm_cl.backbones import build_backbone
from mllm_cl.data.images import ImageProcessor
from mllm_cl.errors import UserError
from mllm_cl.experts import RoutingContext, checkpoint_contexts, expert_layers, routing_context
from mllm_cl.methods import Method
from mllm_cl.system.budget import Budget
from mllm_cl.system.lm_loss import final_norm_deferred, supervised_lm_loss
from mllm_cl.system.schedule import PhaseSchedule

DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
          "float32": torch.float32, "fp32": torch.float32, "float64": torch.float64}


def parse_dtype(name: str | None, key: str) -> torch.dtype | None:
    if name is None:
        return None
    if name not in DTYPES:
        raise UserError(f"{key}: unknown dtype {name!r}; choose one of {', '.join(DTYPES)} or null")
    return DTYPES[name]


def precision_dtype(precision: str | int | None) -> tuple[torch.dtype | None, bool]:
    """(compute dtype, autocast?) of a Lightning ``trainer.precision`` (``None``: 32-true)."""
    name = str(precision if precision is not None else "32-true")
    mixed = name.endswith("-mixed") or name in ("16", "bf16")
    if name.startswith("bf16"):
        return torch.bfloat16, mixed
    if name.startswith("16"):
        return torch.float16, mixed
    if name.startswith("64"):
        return torch.float64, False
    if name.startswith("32"):
        return torch.float32, False
    return None, False  # another plugin (transformer-engine, ...): the base stays as loaded


def base_dtype_for(backbone_dtype: str | None, precision: str | int | None) -> torch.dtype | None:
    """The frozen base's dtype: ``auto`` follows the precision's compute dtype (bf16 under bf16-mixed);
    under autocast, any other dtype is refused: autocast would keep a cast copy of every frozen weight
    for backward (a second copy of the LLM)."""
    compute, mixed = precision_dtype(precision)
    if backbone_dtype == "auto":
        return compute
    dtype = parse_dtype(backbone_dtype, "model.backbone_dtype")
    if mixed and dtype is not None and dtype != compute:
        raise UserError(f"model.backbone_dtype: {backbone_dtype} under trainer.precision {precision} keeps a "
                        f"{compute} copy of every frozen weight for backward (autocast casts them at each "
                        f"forward): set model.backbone_dtype to auto (or {str(compute).removeprefix('torch.')})")
    return dtype


def load_device_for(load_device: str, accelerator: str | None) -> torch.device | None:
    """Where the backbone is built or read to (``None``: the CPU). ``auto``: this process's GPU
    (``cuda:LOCAL_RANK``, the device Lightning gives it) when CUDA is there and ``trainer.accelerator``
    is not ``cpu``; else the CPU."""
    if load_device != "auto":
        try:
            device = torch.device(load_device)
        except (RuntimeError, TypeError) as e:
            raise UserError(f"model.load_device: {load_device!r} is not a device (auto, cpu, cuda, cuda:N)") from e
        return None if device.type == "cpu" else device
    wanted = str(accelerator or "auto").lower()
    if wanted in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return None


class ContinualMLLM(L.LightningModule):
    """Backbone + method.

    Args:
        method: the continual-learning method (``class_path`` in configs/methods/).
        backbone: tiny preset name (random weights from ``backbone_seed``).
        backbone_path: a local backbone directory, wins over ``backbone``: one written by
            ``ComposedMLLM.save_pretrained``, or a transformers Llava / Qwen2-VL / Qwen2.5-VL
            checkpoint (model, tokenizer and image processor files).
        backbone_seed: seed of a preset's random weights.
        backbone_overrides: fields of a random preset replaced, e.g. ``{llm_width: 4096, llm_layers: 2,
            llm_mlp: 11008, heads: 32, kv_heads: 32, vocab_size: 32064}`` (a layer of LLaVA-1.5-7B's shape).
        backbone_dtype: dtype of the frozen base weights. ``auto`` (default): the precision's compute
            dtype (bf16 under ``trainer.precision: bf16-mixed``, float32 under ``32-true``), converted
            once at load. ``bfloat16``, ``float16``, ``float32``, or ``null`` (as saved; float32 for
            presets); under a ``*-mixed`` precision a dtype other than its autocast dtype is refused
            (autocast would keep a second, cast copy of the frozen LLM for backward).
        expert_dtype: dtype of the experts (adapters), whatever the base's (``null``: the base's).
            float32 (default) over a bf16 base is the usual mixed setup: the optimizer updates float32
            master weights, so small updates to a bf16-sized weight are not rounded away, and the
            adapters are a few MB at 7B; autocast computes them in bf16.
        precision: the trainer's precision, set from ``trainer.precision`` (not an option of its own).
        load_device: where the backbone's weights are made or read to, straight from the files:
            ``auto`` (default: this process's GPU when there is one and ``trainer.accelerator`` is not
            ``cpu``, else the CPU), ``cpu``, ``cuda``, ``cuda:N``. The model then stays on its device for
            the whole run; a model loaded elsewhere is moved there once, before the first task.
        accelerator: the trainer's accelerator, set from ``trainer.accelerator`` (not an option of its own).
        attn_implementation: transformers' attention kernel: ``sdpa`` (default, PyTorch's), ``eager``,
            or ``flash_attention_2`` (needs the flash-attn package and a bf16/fp16 base on a GPU).
        gradient_checkpointing: recompute each decoder layer in backward instead of keeping its
            activations (non-reentrant; every method's routing context reaches the recomputation).
            Keeps about one layer input per layer (8 KiB per token at width 4096 in bf16) instead of
            ~180-240 KiB; costs about a third more compute per step. Turn it on for a 7B model on a GPU
            (docs/memory.md); the tiny CPU models do not need it.
        image_size: Qwen2-VL checkpoints only: the fixed square image side (a multiple of 28;
            ``null``: from the image processor, at most 448).
        steps_per_task: optimizer steps per task (a phase may set its own); ``null`` with
            ``epochs_per_task`` set. Exactly one of the two is set (``mllm_cl.system.budget``).
        epochs_per_task: passes over each task's training data instead (CoIN and MCITlib train one);
            an epoch is ``ceil(micro-batches per process / accumulation)`` optimizer steps.
        task_budgets: per-task overrides by task name: ``{ScienceQA: {epochs: 2}, VQAv2: {steps: 3000}}``.
        samples_per_step: samples per optimizer step over all processes (the effective batch): the
            gradient accumulation is ``samples_per_step / (data.batch_size x processes)``, rounded,
            so a config means the same on 1 GPU and on 8. ``null``: ``trainer.accumulate_grad_batches``.
        max_phase_steps: cap on every phase's steps, its own ones included (a method's
            gate or probe phase); for smoke runs. ``None``: no cap.
        lr: AdamW learning rate (the peak, after the warm-up).
        weight_decay: AdamW weight decay (only trainable parameters are in the optimizer).
        schedule: the learning rate after the warm-up: ``constant`` or ``cosine`` (down to
            ``min_lr_ratio`` x lr at the phase's end; LLaVA's and MCITlib's recipe).
        min_lr_ratio: the cosine's floor as a share of ``lr`` (0: down to zero).
        warmup_steps: linear learning-rate warm-up at the start of every phase, in steps.
        warmup_ratio: the warm-up as a share of every phase's steps instead (MCITlib: 0.03).
        grad_clip: clip the gradient norm to this (0: off). The one place clipping is set:
            ``trainer.gradient_clip_val`` and ``trainer.gradient_clip_algorithm`` are refused.
    """

    def __init__(
        self,
        method: Method,
        *,
        backbone: str = "tiny-clip-llama",
        backbone_path: str | None = None,
        backbone_seed: int = 0,
        backbone_overrides: dict[str, Any] | None = None,
        backbone_dtype: str | None = "auto",
        expert_dtype: str | None = "float32",
        precision: str | int | None = None,
        load_device: str = "auto",
        accelerator: str | None = None,
        attn_implementation: str = "sdpa",
        gradient_checkpointing: bool = False,
        image_size: int | None = None,
        steps_per_task: int | None = 100,
        epochs_per_task: float | None = None,
        task_budgets: dict[str, dict[str, float]] | None = None,
        samples_per_step: int | None = None,
        max_phase_steps: int | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        schedule: str = "constant",
        min_lr_ratio: float = 0.0,
        warmup_steps: int = 0,
        warmup_ratio: float = 0.0,
        grad_clip: float = 1.0,
    ) -> None:
        super().__init__()
        self.budget = Budget(steps_per_task=steps_per_task, epochs_per_task=epochs_per_task, task_budgets=task_budgets,
                             samples_per_step=samples_per_step, lr=lr, schedule=schedule, min_lr_ratio=min_lr_ratio,
                             warmup_steps=warmup_steps, warmup_ratio=warmup_ratio, max_phase_steps=max_phase_steps)
        base_dtype = base_dtype_for(backbone_dtype, precision)
        device = load_device_for(load_device, accelerator if isinstance(accelerator, str) else None)
        built = build_backbone(backbone, path=backbone_path, seed=backbone_seed, dtype=base_dtype,
                               image_size=image_size, attn_implementation=attn_implementation,
                               overrides=backbone_overrides, device=device)
        self.model, self.tokenizer = built.model, built.tokenizer
        self.model.requires_grad_(False)
        self.method = method
        method.tokenizer = self.tokenizer
        self.injection = method.build(self.model)
        adapter_dtype = parse_dtype(expert_dtype, "model.expert_dtype")
        for layer in expert_layers(self.model).values():
            layer.expert_dtype = adapter_dtype
            layer.experts.to(adapter_dtype)
        self.gradient_checkpointing = gradient_checkpointing
        if gradient_checkpointing:
            self.model.set_checkpointing(True, context_fn=checkpoint_contexts(self.model))
        self.backbone_info = {"preset": None if backbone_path else backbone, "path": backbone_path,
                              "seed": backbone_seed,
                              "overrides": backbone_overrides, "dtype": str(base_dtype).removeprefix("torch.")
                              if base_dtype is not None else None, "expert_dtype": expert_dtype,
                              "image_size": image_size, "attn_implementation": attn_implementation}
        self.lr, self.weight_decay, self.grad_clip = lr, weight_decay, grad_clip
        self.log_prefix = "train"  # the loop sets "taskN_NAME/PHASE"
        self.step_offset = 0  # the run's logged steps before this phase (the loop sets it): one axis for the run
        self._log_hyperparams = False  # the loop logs the resolved config once per run, not these per phase
        self.phase_schedule: PhaseSchedule | None = None  # the loop sets each phase's (budget.PhasePlan)
        self.fast_forward = 0  # micro-batches to draw without training (system/in_task.py sets it on resume)

    def image_processor(self) -> ImageProcessor:
        return ImageProcessor.for_model(self.model)

    # ----------------------------------------------------------------- training
    def forward_batch(self, batch: dict[str, Any], *, training: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(language-model loss, the method's extra loss or None) of a batch with labels."""
        context = self.method.routing_context(batch, training=training) or RoutingContext()
        if context.token_mask is None:
            # The prompt's tokens (real, not trained on): what whole-prompt routers pool over,
            # the same tokens they see at evaluation, where the answer does not exist yet.
            mask = batch["attention_mask"].bool()
            if batch.get("labels") is not None:
                mask = mask & (batch["labels"] == -100)
            context.token_mask = mask
        with routing_context(self.model, context):
            with final_norm_deferred(self.model.text_decoder) as norm:  # norm and head at the supervised rows
                out = self.model(batch["input_ids"], attention_mask=batch["attention_mask"],
                                 pixel_values=batch["pixel_values"], hidden_only=True, use_cache=False,
                                 **batch.get("model_inputs", {}))
            head = self.model.output_head
            loss = supervised_lm_loss(out.last_hidden_state, batch["labels"], lambda h: head(norm(h)),
                                      batch.get("loss_positions"))
            extra = self.method.extra_loss(self.model, batch) if training else None
        return loss, extra

    def on_train_start(self) -> None:
        # Lightning logs at its count of stepped batches (self.log, LearningRateMonitor, DeviceStatsMonitor);
        # started at the run's steps so far, the phases of a run log on one axis.
        self.trainer.fit_loop.epoch_loop._batches_that_stepped = self.step_offset

    def training_step(self, batch: dict[str, Any], batch_idx: int):
        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None and hasattr(dm, "note_batch"):
            dm.note_batch(batch)
        if self.fast_forward:  # resuming within a phase: a micro-batch the checkpoint had trained on
            self.fast_forward -= 1
            batch["empty"] = True  # what callbacks skip: nothing trains on it
        if batch.get("empty"):
            return None  # every sample of this batch was skipped as bad input
        lm_loss, extra = self.forward_batch(batch, training=True)
        loss = lm_loss if extra is None else lm_loss + extra
        n = batch["input_ids"].shape[0]
        self.log(f"{self.log_prefix}/loss", lm_loss.detach(), prog_bar=True, batch_size=n)
        if extra is not None:
            self.log(f"{self.log_prefix}/extra_loss", extra.detach(), batch_size=n)
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        # Methods that rewrite gradients (SAME) hook in here: after backward, before clipping.
        for layer in expert_layers(self.model).values():
            layer.apply_gradient_transforms()

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def configure_optimizers(self):
        params = self.trainable_parameters()
        if not params:
            raise RuntimeError(f"method {self.method.name}: nothing is trainable in this phase")
        plan = self.phase_schedule
        if plan is None:  # a Trainer of its own, outside the continual loop: the model's options over its steps
            b = self.budget
            total = max(1, self._trainer.max_steps) if self._trainer is not None else 1
            plan = PhaseSchedule(lr=self.lr, total=total, warmup=b.warmup_steps or round(b.warmup_ratio * total),
                                 schedule=b.schedule, floor=b.min_lr_ratio)
        optimizer = torch.optim.AdamW(params, lr=plan.lr, weight_decay=self.weight_decay)
        if plan.warmup <= 0 and plan.schedule == "constant":
            return optimizer
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, plan.factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        if self.grad_clip > 0:
            self.clip_gradients(optimizer, gradient_clip_val=self.grad_clip, gradient_clip_algorithm="norm")

    def check_gradient_clipping(self, trainer: L.Trainer) -> None:
        """Clip a stand-in gradient as every optimizer step will, under ``trainer``'s options and precision:
        a clash (``trainer.gradient_clip_val``) or a precision that cannot clip fails here, before a run
        evaluates anything. Raises UserError."""
        stand_in = torch.nn.Parameter(torch.zeros(1))
        stand_in.grad = torch.ones(1)
        optimizer = torch.optim.SGD([stand_in], lr=0.0)
        previous, self._trainer = self._trainer, trainer
        try:
            self.configure_gradient_clipping(optimizer)
        except (MisconfigurationException, NotImplementedError, RuntimeError) as e:
            raise UserError(f"model.grad_clip ({self.grad_clip}) under these trainer options: "
                            f"{' '.join(str(e).split())}") from e
        finally:
            self._trainer = previous
