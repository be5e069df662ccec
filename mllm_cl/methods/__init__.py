"""Continual-learning methods: a ``Method`` says where experts go and what trains in each phase."""

from mllm_cl.methods.base import Method, Phase
from mllm_cl.methods.baselines import Individual, LoRAFineTune, MoELoRA, MultiTask, ZeroShot
from mllm_cl.methods.cmoe import LLaVACMoE
from mllm_cl.methods.cram import CRAM
from mllm_cl.methods.routing import RoutingCL
from mllm_cl.methods.same import SAME

__all__ = ["CRAM", "Individual", "LLaVACMoE", "LoRAFineTune", "Method", "MoELoRA", "MultiTask", "Phase", "RoutingCL",
           "SAME", "ZeroShot"]
