"""Using what a run trained: ``mllm-cl predict`` (its model answers, routed as at evaluation) and
``mllm-cl export`` (its experts as PEFT LoRA adapters)."""
