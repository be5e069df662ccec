"""A fixed mixture of experts of different ranks, written as one PEFT adapter (``_lora`` + ``write_adapter``),
gives the expert layer's own logits on the plain base, for a composed backbone and a transformers Llava."""

import pytest
import torch
from peft import PeftModel

from mllm_cl.backbones.hf_tiny import tiny_llava
from mllm_cl.backbones.presets import build_backbone
from mllm_cl.experts import ExpertLayer, Routing, expert_layers
from mllm_cl.experts.injection import inject_experts, language_model_scope
from mllm_cl.experts.routers import Router
from mllm_cl.use.export import _lora, peft_base, write_adapter


class Constant(Router):
    """The same dense weights for every token: a fixed mixture."""

    level = "batch"

    def __init__(self, in_features: int, weights: list[float]) -> None:
        super().__init__(in_features)
        self.w = weights

    def forward(self, x, context):
        return Routing(weights=torch.tensor(self.w, dtype=x.dtype).view(*([1] * (x.dim() - 1)), -1))


@pytest.fixture(params=["composed", "llava"])
def backbone(request, tmp_path):
    if request.param == "composed":
        return lambda: build_backbone("tiny-clip-llama", seed=0)
    path = tiny_llava(tmp_path / "llava")
    return lambda: build_backbone(path=str(path))


def test_a_fixed_mixture_is_one_exact_lora_of_the_summed_rank(backbone, tmp_path):
    built = backbone()
    model = built.model
    mixtures = {}

    def make(name, linear):
        first = ".layers.0." in name  # two experts (rank 2 and 3) there, one (rank 2) elsewhere: rank_pattern
        weights = [0.3, 0.7] if first else [1.0]
        layer = ExpertLayer(linear, router=Constant(linear.in_features, weights))
        for e, r in zip("ab", (2, 3)[:len(weights)], strict=False):
            torch.nn.init.normal_(layer.add_expert(e, rank=r).B, std=0.05)
        mixtures[name] = dict(zip("ab", weights, strict=False))
        return layer

    inject_experts(model, ["q_proj", "v_proj", "down_proj"], make, scope=language_model_scope(model))
    _, prefix = peft_base(model)
    layers = expert_layers(model)
    modules = {}
    for name, layer in layers.items():
        A, B = _lora(layer, mixtures[name])
        modules[name.removeprefix(prefix)] = (A, B, float(A.shape[0]))
    write_adapter(tmp_path / "mix", modules, base_name=None)

    ids = torch.randint(0, 200, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad():
        ours = model(ids, attention_mask=mask).logits
        base = peft_base(backbone().model)[0].eval()
        plain = base(input_ids=ids, attention_mask=mask).logits
        peft = PeftModel.from_pretrained(base, str(tmp_path / "mix")).eval()
        ranks = {n: m.lora_A["default"].weight.shape[0] for n, m in peft.base_model.model.named_modules()
                 if hasattr(m, "lora_A") and "default" in m.lora_A}
        theirs = peft(input_ids=ids, attention_mask=mask).logits
    assert ranks == {n.removeprefix(prefix): (5 if ".layers.0." in n else 2) for n in layers}
    diff = float((ours - theirs)[mask.bool()].abs().max())
    print(f"fixed mixture, {type(base).__name__}: max |logit difference| ours vs PEFT {diff:.3g}")
    assert diff < 1e-5
    assert float((ours - plain)[mask.bool()].abs().max()) > 1e-3
