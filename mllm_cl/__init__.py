"""mllm-cl: multimodal continual instruction tuning with swappable expert layers and routers."""

__version__ = "0.1.0"

from mllm_cl import _packages  # noqa: F401  finds mllm_cl.callbacks / mllm_cl.data_modules; the old names
