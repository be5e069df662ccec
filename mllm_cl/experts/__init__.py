"""Expert layers, routers, injection and the routing context (pure torch, no Lightning)."""

from mllm_cl.experts.injection import (
    InjectionReport,
    checkpoint_contexts,
    expert_layers,
    find_targets,
    inject_experts,
    language_model_scope,
    mark_only_experts_trainable,
    routing_context,
)
from mllm_cl.experts.layer import ExpertLayer
from mllm_cl.experts.lora import LoRAExpert
from mllm_cl.experts.routers import (
    BatchMeanRouter,
    CentroidRouter,
    FixedRouter,
    LinearRouter,
    PostHocGateRouter,
    Router,
    SequenceTopKRouter,
    SoftmaxRouter,
    TaskRouter,
    TopKRouter,
)
from mllm_cl.experts.routing import ContextSlot, Routing, RoutingContext
from mllm_cl.experts.setup import ExpertSetup
from mllm_cl.experts.spectral import CovarianceSketch

__all__ = [
    "checkpoint_contexts",
    "BatchMeanRouter",
    "CentroidRouter",
    "ContextSlot",
    "CovarianceSketch",
    "ExpertLayer",
    "ExpertSetup",
    "FixedRouter",
    "InjectionReport",
    "LinearRouter",
    "PostHocGateRouter",
    "LoRAExpert",
    "Router",
    "Routing",
    "RoutingContext",
    "SequenceTopKRouter",
    "SoftmaxRouter",
    "TaskRouter",
    "TopKRouter",
    "expert_layers",
    "find_targets",
    "inject_experts",
    "language_model_scope",
    "mark_only_experts_trainable",
    "routing_context",
]
