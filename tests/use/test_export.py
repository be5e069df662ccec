"""`mllm-cl export` on finished micro runs: PEFT loads every adapter on the plain base, and a task's
adapter gives our logits under true-task routing; a routed method gets experts only, and says why."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from mllm_cl.backbones.hf_tiny import tiny_qwen3_vl
from mllm_cl.cli import main
from mllm_cl.experts import expert_layers, routing_context
from mllm_cl.system.restore import restore
from mllm_cl.use.export import load_base

ROOT = Path(__file__).resolve().parents[2]


def _logits_ours_and_peft(restored, adapter: Path, task: int, base_info: dict):
    """(ours under the method's evaluation routing, PEFT's adapter on a freshly built plain base, the plain base)
    for task ``task``'s test prompts."""
    module, dm = restored.module, restored.datamodule
    data = dm.test_dataset(task)
    batch = dm.eval_collate([data[i] for i in range(len(data))])
    ids, mask, pixels = batch["input_ids"], batch["attention_mask"], batch["pixel_values"]
    position = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        with routing_context(module.model, module.method.routing_context(batch, training=False)):
            ours = module.model(ids, attention_mask=mask, pixel_values=pixels, position_ids=position).logits
        embeds = module.model.embed(ids, pixels)  # vision tower + projector: no experts there
        base = load_base(base_info)
        plain = base(inputs_embeds=embeds, attention_mask=mask, position_ids=position).logits
        peft = PeftModel.from_pretrained(base, str(adapter)).eval()
        theirs = peft(inputs_embeds=embeds, attention_mask=mask, position_ids=position).logits
    real = mask.bool()
    return ours[real], theirs[real], plain[real]


@pytest.mark.parametrize("method", ["lora_ft", "individual"])
def test_each_task_adapter_gives_our_logits_on_the_plain_base(micro_run, method, tmp_path, capsys):
    run, out = micro_run(method), tmp_path / "export"
    assert main(["export", str(run), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    routing = json.loads((out / "routing.json").read_text())
    assert routing["method"] == method and routing["routing"] == "fixed per task" and routing["stage"] == 2
    restored = restore(run)
    names = restored.datamodule.task_names
    own = {"lora_ft": {"colour": "shared", "mood": "shared"}, "individual": {"colour": "task0", "mood": "task1"}}
    folder = {"lora_ft": {"shared": "."}, "individual": {"task0": "task0", "task1": "task1"}}[method]
    for t, task in enumerate(names):
        # one expert per task, weight 1: the expert's own adapter is the task's (no copy)
        adapter = folder[own[method][task]]
        assert routing["tasks"][task] == {"experts": {own[method][task]: 1.0}, "adapter": adapter}
        assert f"{out / adapter}: task {task} exactly ({own[method][task]})" in printed
        ours, theirs, plain = _logits_ours_and_peft(restored, out / adapter, t, routing["base"])
        diff = float((ours - theirs).abs().max())
        print(f"{method} task {task}: max |logit difference| ours vs PEFT {diff:.3g}, "
              f"vs the plain base {float((ours - plain).abs().max()):.3g}")
        assert diff < 1e-5
        assert float((ours - plain).abs().max()) > 1e-3  # the adapter matters: the comparison can fail
    assert not list(out.glob("task_*"))
    config = json.loads((out / folder[own[method]["colour"]] / "adapter_config.json").read_text())
    layers = expert_layers(restored.module.model)
    assert config["peft_type"] == "LORA" and config["r"] == 8 and config["lora_alpha"] == 16
    assert sorted(config["target_modules"]) == sorted(n.removeprefix("language_model.") for n in layers)


def test_a_routed_method_exports_its_experts_and_no_per_task_approximation(micro_run, tmp_path):
    run, out = micro_run("routing"), tmp_path / "export"
    cmd = subprocess.run([sys.executable, "-m", "mllm_cl.cli", "export", str(run), "--out", str(out)],
                         capture_output=True, text=True, cwd=ROOT, timeout=300,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert cmd.returncode == 0, cmd.stderr[-3000:]
    assert "no per-task adapter: this method's routing depends on the sample or the token" in cmd.stdout
    routing = json.loads((out / "routing.json").read_text())
    assert routing["routing"] == "depends on the sample or the token" and not routing["per_task_adapters"]
    assert routing["routers"]["PostHocGateRouter"]["level"] == "token"
    assert routing["tasks"]["colour"] == {"trained_experts": ["task0"], "routed_over": ["task0", "task1"],
                                          "adapter": None}
    assert not list(out.glob("task_*")) and sorted(routing["experts"]) == ["task0", "task1"]
    # every exported expert is exactly ours, module by module, inside the PEFT model
    restored = restore(run)
    layers = expert_layers(restored.module.model)
    for expert in ("task0", "task1"):
        peft = PeftModel.from_pretrained(load_base(routing["base"]), str(out / expert)).eval()
        inner = dict(peft.base_model.model.named_modules())
        worst = 0.0
        for name, layer in layers.items():
            x = torch.randn(3, 5, layer.in_features)
            lora = inner[name.removeprefix("language_model.")]
            with torch.no_grad():
                delta = lora(x) - lora.base_layer(x)
                worst = max(worst, float((delta - layer.experts[expert](x)).abs().max()))
            assert float(layer.experts[expert](x).abs().max()) > 0  # a trained expert: B is not zero
        print(f"routing expert {expert}: max |delta difference| ours vs PEFT over {len(layers)} modules {worst:.3g}")
        assert worst < 1e-5, (expert, worst)


def test_a_transformers_backbone_exports_onto_the_transformers_model(micro_run, tmp_path, tmp_path_factory):
    checkpoint = tiny_qwen3_vl(tmp_path_factory.mktemp("qwen3_vl"))
    run, out = micro_run("individual", checkpoint), tmp_path / "export"
    assert main(["export", str(run), "--out", str(out)]) == 0
    routing = json.loads((out / "routing.json").read_text())
    assert routing["base"]["path"] == str(checkpoint) and "HFMLLM.hf" in routing["base"]["peft_base"]
    restored = restore(run)
    module, dm = restored.module, restored.datamodule
    for t, task in enumerate(dm.task_names):
        adapter = out / routing["tasks"][task]["adapter"]
        assert (json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
                == str(checkpoint.resolve()))
        data = dm.test_dataset(t)
        batch = dm.eval_collate([data[i] for i in range(len(data))])
        ids, mask, inputs = batch["input_ids"], batch["attention_mask"], batch["model_inputs"]
        with torch.no_grad():
            with routing_context(module.model, module.method.routing_context(batch, training=False)):
                ours = module.model(ids, attention_mask=mask, pixel_values=batch["pixel_values"],
                                    position_ids=(mask.cumsum(-1) - 1).clamp(min=0), **inputs).logits
            base = load_base(routing["base"])
            plain = base(input_ids=ids, attention_mask=mask, pixel_values=batch["pixel_values"], **inputs).logits
            peft = PeftModel.from_pretrained(base, str(adapter)).eval()
            assert type(peft.base_model.model).__name__ == "Qwen3VLForConditionalGeneration"
            theirs = peft(input_ids=ids, attention_mask=mask, pixel_values=batch["pixel_values"], **inputs).logits
        real = mask.bool()
        diff = float((ours - theirs)[real].abs().max())
        print(f"qwen3_vl individual task {task}: max |logit difference| ours vs PEFT {diff:.3g}, "
              f"vs the plain base {float((ours - plain)[real].abs().max()):.3g}")
        assert diff < 1e-4 and float((ours - plain)[real].abs().max()) > 1e-4
