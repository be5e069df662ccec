"""Injection: find target linears by name and wrap them in ExpertLayers, in place.

Matching follows PEFT's ``check_target_module_exists``: an entry matches a
module whose full name equals it or ends with ``.entry`` (dotted suffix);
an entry written ``re:PATTERN`` must match the full name (``re.fullmatch``).
``layers`` keeps only modules inside those block indices
(``...layers.3.self_attn.q_proj`` is layer 3).

By default only the language model is searched: on Llava-like models
``q_proj`` also names the vision tower's attention, which must stay frozen.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from torch import nn

from mllm_cl.experts.layer import ExpertLayer
from mllm_cl.experts.routing import ContextSlot, RoutingContext

_LAYER_INDEX = re.compile(r"\.(?:layers|layer|h|blocks)\.(\d+)(?:\.|$)")
_LM_NAMES = ("language_model", "text_model", "llm")


@dataclass
class InjectionReport:
    scope: str
    matched: list[str]
    per_target: dict[str, int] = field(default_factory=dict)

    @property
    def unmatched_targets(self) -> list[str]:
        return [t for t, n in self.per_target.items() if n == 0]

    def __str__(self) -> str:
        lines = [f"injected {len(self.matched)} expert layers under {self.scope or '<model>'!r}"]
        lines += [f"  {t}: {n} modules" for t, n in self.per_target.items()]
        if self.unmatched_targets:
            lines.append(f"  (no match for: {', '.join(self.unmatched_targets)})")
        return "\n".join(lines)


def language_model_scope(model: nn.Module) -> str:
    """The module path of the language model inside an MLLM ('' for a bare LLM).

    The shallowest module whose last name is ``language_model``/``text_model``/``llm``.
    """
    found = [n for n, _ in model.named_modules() if n and n.rsplit(".", 1)[-1] in _LM_NAMES]
    return min(found, key=lambda n: n.count(".")) if found else ""


def layer_index(name: str) -> int | None:
    m = _LAYER_INDEX.search("." + name)
    return int(m.group(1)) if m else None


def _matches(entry: str, name: str) -> bool:
    if entry.startswith("re:"):
        return re.fullmatch(entry[3:], name) is not None
    return name == entry or name.endswith("." + entry)


def find_targets(
    model: nn.Module,
    target_modules: Sequence[str],
    *,
    layers: Sequence[int] | None = None,
    scope: str | None = None,
) -> InjectionReport:
    """Names of the ``nn.Linear`` modules to wrap; raises when nothing matches."""
    if isinstance(target_modules, str):
        target_modules = [target_modules]
    if not target_modules:
        raise ValueError("target_modules is empty: name at least one module (e.g. ['q_proj', 'v_proj'])")
    scope = language_model_scope(model) if scope is None else scope
    if scope and scope not in dict(model.named_modules()):
        raise ValueError(f"scope {scope!r} is not a module of {type(model).__name__}")
    prefix = scope + "." if scope else ""
    linears = [
        n for n, m in model.named_modules()
        if n.startswith(prefix) and isinstance(m, nn.Linear) and not n.endswith(".base_layer")
    ]
    per_target = {t: 0 for t in target_modules}
    matched = []
    for name in linears:
        local = name[len(prefix):]
        hits = [t for t in target_modules if _matches(t, name) or _matches(t, local)]
        if not hits:
            continue
        if layers is not None and layer_index(local) not in set(layers):
            continue
        for t in hits:
            per_target[t] += 1
        matched.append(name)
    already = [n for n, m in model.named_modules() if n.startswith(prefix) and isinstance(m, ExpertLayer)]
    if not matched:
        sample = ", ".join(linears[:12]) + (" ..." if len(linears) > 12 else "")
        raise ValueError(
            f"target_modules {list(target_modules)}"
            + (f" with layers {list(layers)}" if layers is not None else "")
            + f" matched no nn.Linear under {scope or '<model>'!r}. "
            + (f"Linear modules there: {sample}" if linears else "There are no nn.Linear modules there.")
            + (f" ({len(already)} are already ExpertLayers)" if already else "")
        )
    return InjectionReport(scope=scope, matched=matched, per_target=per_target)


def inject_experts(
    model: nn.Module,
    target_modules: Sequence[str],
    make_layer: Callable[[str, nn.Linear], ExpertLayer],
    *,
    layers: Sequence[int] | None = None,
    scope: str | None = None,
) -> InjectionReport:
    """Replace each matched linear by ``make_layer(name, linear)``, in place.

    All expert layers of the model share one routing-context slot.
    """
    report = find_targets(model, target_modules, layers=layers, scope=scope)
    slot = _model_slot(model)
    for name in report.matched:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = make_layer(name, getattr(parent, child))
        if not isinstance(layer, ExpertLayer):
            raise TypeError(f"make_layer returned {type(layer).__name__} for {name}, expected an ExpertLayer")
        layer.slot = slot
        setattr(parent, child, layer)
    return report


def _model_slot(model: nn.Module) -> ContextSlot:
    slots = {id(layer.slot): layer.slot for layer in expert_layers(model).values() if layer.slot is not None}
    return next(iter(slots.values())) if slots else ContextSlot()


def expert_layers(model: nn.Module) -> dict[str, ExpertLayer]:
    """Every ExpertLayer of ``model`` by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, ExpertLayer)}


@contextlib.contextmanager
def routing_context(model: nn.Module, context: RoutingContext | None = None, **signals) -> Iterator[RoutingContext]:
    """Make ``context`` (or one built from ``signals``) visible to every expert layer
    of ``model`` for the duration of the ``with`` block::

        with routing_context(model, task_ids=batch["task_ids"]):
            out = model(**inputs)
        with routing_context(model, disable_adapters=True):
            base_features = model(**inputs)
    """
    if context is None:
        context = RoutingContext(**signals)
    elif signals:
        raise TypeError("pass either a RoutingContext or keyword signals, not both")
    layers = expert_layers(model)
    slots = {id(layer.slot): layer.slot for layer in layers.values() if layer.slot is not None}
    if not slots and layers:
        raise RuntimeError("expert layers have no context slot; wrap modules with inject_experts()")
    with contextlib.ExitStack() as stack:
        for slot in slots.values():
            stack.enter_context(slot.use(context))
        yield context


def checkpoint_contexts(model: nn.Module):
    """``context_fn`` for ``torch.utils.checkpoint`` over ``model``'s layers: the routing context of each
    checkpointed forward is put back for its recomputation (``ContextSlot.checkpoint_contexts``)."""
    slots = {id(layer.slot): layer.slot for layer in expert_layers(model).values() if layer.slot is not None}
    if not slots:
        return None
    if len(slots) > 1:
        raise RuntimeError("activation checkpointing needs the expert layers of one model to share one context slot")
    return next(iter(slots.values())).checkpoint_contexts


def mark_only_experts_trainable(model: nn.Module) -> None:
    """Freeze everything but expert and router parameters (which keep their own flags)."""
    keep = set()
    for layer in expert_layers(model).values():
        keep.update(id(p) for p in layer.experts.parameters() if p.requires_grad)
        keep.update(id(p) for p in layer.routers.parameters() if p.requires_grad)
    for p in model.parameters():
        if id(p) not in keep:
            p.requires_grad_(False)
