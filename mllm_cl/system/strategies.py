"""Which Lightning strategy a run may use with which method, checked before anything is built.

| strategy (``trainer.strategy``)          | runs                                        |
|------------------------------------------|---------------------------------------------|
| ``auto`` / one device                    | every method                                |
| ``ddp`` (and ``DDPStrategy``)            | every method (tested: 2 CPU processes, gloo) |
| ``ddp_spawn``, ``ddp_fork``, ``ddp_notebook`` | none: experts created in the workers are lost |
| ``fsdp``, ``deepspeed*``                 | none yet (see ``SHARDED_REASON``)           |

A method can refuse more (``Method.refused_strategies``), e.g. one that rewrites
whole gradients between backward and the optimizer step cannot see them when
a sharded strategy holds one shard per process.
"""

from __future__ import annotations

from typing import Any

SHARDED_REASON = (
    "mllm-cl adds and freezes experts between phases and evaluates the unwrapped model between tasks; a sharded "
    "strategy keeps only a shard of each parameter in each process outside its fit, and gathering them for that "
    "is not built. Use ddp (with model.backbone_dtype bfloat16 to halve the base model's memory)")
SPAWN_REASON = ("a spawned worker's new experts are copied back non-strictly and lost; use ddp (it starts the "
                "processes by re-running this command)")


def strategy_kind(strategy: Any) -> str:
    """``single``, ``ddp``, ``spawn``, ``fsdp`` or ``deepspeed`` for a config value (a name, a
    ``{class_path: ...}`` mapping or a Strategy object)."""
    if isinstance(strategy, dict):
        name = str(strategy.get("class_path", "")).rsplit(".", 1)[-1]
    elif isinstance(strategy, str):
        name = strategy
    else:
        name = type(strategy).__name__
    name = name.lower()
    if name in ("auto", "single_device", "singledevicestrategy", "single_xla"):
        return "single"
    if "deepspeed" in name:
        return "deepspeed"
    if "fsdp" in name:
        return "fsdp"
    if any(s in name for s in ("spawn", "fork", "notebook")):
        return "spawn"
    if name.startswith("ddp"):
        return "ddp"
    raise ValueError(f"trainer.strategy: {name!r} is not one mllm-cl knows; use auto, ddp, fsdp or deepspeed")


def check_strategy(strategy: Any, method_cls: type) -> str:
    """The strategy's kind; raises naming strategy and method where the pair cannot run."""
    kind = strategy_kind(strategy)
    shown = strategy if isinstance(strategy, str) else kind
    method = getattr(method_cls, "name", method_cls.__name__)
    refused = {"spawn": SPAWN_REASON, "fsdp": SHARDED_REASON, "deepspeed": SHARDED_REASON}
    refused.update(getattr(method_cls, "refused_strategies", {}))
    if kind in refused:
        raise ValueError(f"method {method} cannot run under trainer.strategy {shown!r}: {refused[kind]}")
    return kind
