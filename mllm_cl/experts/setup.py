"""``ExpertSetup``: the config object that says where experts go and how they are routed.

A method YAML selects it (and any Router subclass) by ``class_path``; the
layer's input size is supplied here, so YAML omits it::

    experts:
      target_modules: [q_proj, v_proj]
      rank: 8
      router:
        class_path: mllm_cl.experts.TopKRouter
        init_args: {top_k: 2}
      initial_experts: [e0, e1, e2, e3]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn

from mllm_cl.experts.injection import InjectionReport, inject_experts
from mllm_cl.experts.layer import ExpertLayer
from mllm_cl.experts.routers import Router


class ExpertSetup:
    """Injection targets, expert defaults and the router of every adapted layer.

    Args:
        target_modules: module names to adapt: exact, dotted suffix (``q_proj``)
            or ``re:PATTERN`` matched against the full name.
        layers: only these block indices (``None``: every block).
        scope: module path searched for targets (``None``: the language model).
        rank: default expert rank.
        alpha: default LoRA alpha (``None``: 2 * rank, scale 2).
        dropout: dropout on the expert input.
        router: builds each layer's router from its input size (``None``: no
            router, for layers that hold a single expert).
        initial_experts: experts added to every layer at injection.
    """

    def __init__(
        self,
        target_modules: Sequence[str],
        *,
        layers: Sequence[int] | None = None,
        scope: str | None = None,
        rank: int = 8,
        alpha: float | None = None,
        dropout: float = 0.0,
        router: Callable[[int], Router] | None = None,
        initial_experts: Sequence[str] = (),
    ) -> None:
        self.target_modules = list(target_modules)
        self.layers = None if layers is None else list(layers)
        self.scope = scope
        self.rank = rank
        self.alpha = alpha
        self.dropout = dropout
        self.router = router
        self.initial_experts = list(initial_experts)

    def make_layer(self, name: str, linear: nn.Linear) -> ExpertLayer:
        router = self.router(linear.in_features) if self.router is not None else None
        layer = ExpertLayer(linear, router=router, rank=self.rank, alpha=self.alpha, dropout=self.dropout)
        for expert in self.initial_experts:
            layer.add_expert(expert)
        return layer

    def apply(self, model: nn.Module) -> InjectionReport:
        return inject_experts(model, self.target_modules, self.make_layer, layers=self.layers, scope=self.scope)
