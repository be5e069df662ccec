"""Using a finished run in a first hour: ``predict``, ``export`` and ``evaluate`` print their own lines only,
their modules load without torch until they run, ``export`` writes each adapter once with what PEFT's auto
classes need to load it, and cmoe's probe phase is a share of the task's budget. Real subprocesses for the
commands, output through pipes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from mllm_cl.cli import main

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
SEED_LINE, DATA_LINE = "Seed set to", "mllm-cl: data: files of"


def _cli(*args: str) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "mllm_cl.cli", *args], capture_output=True, text=True, cwd=ROOT,
                         timeout=300, env=ENV)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


# ------------------------------------------------------------------------------------------ quiet and light
def test_predict_export_and_evaluate_print_no_seed_or_data_check_line_unless_verbose(micro_run, use_bench,
                                                                                    tmp_path):
    run = micro_run("lora_ft")
    prompt = ["predict", str(run), "--image", str(use_bench / "images/red.png"), "--prompt", "What colour is it?"]
    quiet = {"predict": _cli(*prompt),
             "export": _cli("export", str(run), "--out", str(tmp_path / "export")),
             "evaluate": _cli("evaluate", str(run), "--out", str(tmp_path / "again"))}
    for command, out in quiet.items():
        printed = out.stdout + out.stderr
        assert SEED_LINE not in printed and DATA_LINE not in printed, (command, printed)
    assert quiet["predict"].stdout.startswith("mllm-cl predict: lora_ft at stage 02 of ")
    assert "answer: " in quiet["predict"].stdout
    assert "mllm-cl evaluate: " in quiet["evaluate"].stdout and "stage 02: " in quiet["evaluate"].stdout
    loud = _cli(*prompt, "--verbose")
    printed = loud.stdout + loud.stderr
    assert printed.count(SEED_LINE) == 1 and printed.count(DATA_LINE) == 1, printed
    assert loud.stdout.split("answer: ")[1] == quiet["predict"].stdout.split("answer: ")[1]


def test_the_use_commands_load_without_torch_until_they_run():
    code = ("import sys; import mllm_cl.use.predict, mllm_cl.use.export, mllm_cl.use.evaluate; "
            "print(sorted(m for m in ('torch', 'lightning', 'transformers', 'peft') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120, env=ENV)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------------------------------------- export
def _our_logits_and_auto_peft(run: Path, adapter: Path, task: int):
    """(ours under the method's evaluation routing, ``AutoPeftModel.from_pretrained(adapter)``'s) for task
    ``task``'s test prompts, on their real tokens; and the loaded PEFT model."""
    from peft import AutoPeftModel

    from mllm_cl.experts import routing_context
    from mllm_cl.system.restore import restore

    restored = restore(run)
    module, dm = restored.module, restored.datamodule
    data = dm.test_dataset(task)
    batch = dm.eval_collate([data[i] for i in range(len(data))])
    ids, mask, pixels = batch["input_ids"], batch["attention_mask"], batch["pixel_values"]
    position = (mask.cumsum(-1) - 1).clamp(min=0)
    peft = AutoPeftModel.from_pretrained(str(adapter)).eval()
    with torch.no_grad():
        with routing_context(module.model, module.method.routing_context(batch, training=False)):
            ours = module.model(ids, attention_mask=mask, pixel_values=pixels, position_ids=position).logits
        embeds = module.model.embed(ids, pixels)  # the vision tower and projector carry no experts
        theirs = peft(inputs_embeds=embeds, attention_mask=mask, position_ids=position).logits
    real = mask.bool()
    return ours[real], theirs[real], peft


@pytest.mark.parametrize("method", ["lora_ft", "individual"])
def test_export_writes_each_adapter_once_and_auto_peft_model_loads_it_with_its_base(micro_run, method, tmp_path):
    run, out = micro_run(method), tmp_path / "export"
    assert main(["export", str(run), "--out", str(out)]) == 0
    routing = json.loads((out / "routing.json").read_text())
    adapters = sorted(p.parent for p in out.rglob("adapter_config.json"))
    expected = {"lora_ft": [out], "individual": [out / "task0", out / "task1"]}[method]
    assert adapters == expected  # one shared adapter for lora_ft, at DIR itself; no per-task copies
    assert sorted(routing["experts"]) == {"lora_ft": ["shared"], "individual": ["task0", "task1"]}[method]
    for t, task in enumerate(["colour", "mood"]):
        entry = routing["tasks"][task]
        assert (out / entry["adapter"]).resolve() == expected[0 if method == "lora_ft" else t].resolve()
        config = json.loads((out / entry["adapter"] / "adapter_config.json").read_text())
        assert config["auto_mapping"] == {"base_model_class": "LlamaForCausalLM",
                                          "parent_library": "transformers.models.llama.modeling_llama"}
        base = Path(config["base_model_name_or_path"])
        # the micro runs' random tiny preset has no files of its own: the base is written beside the adapters
        assert base == (out / "base").resolve() and (base / "config.json").is_file()
        assert routing["base"]["peft_base_path"] == str(base)
        ours, theirs, peft = _our_logits_and_auto_peft(run, out / entry["adapter"], t)
        assert type(peft.base_model.model).__name__ == "LlamaForCausalLM"
        assert float((ours - theirs).abs().max()) < 1e-5


def test_export_records_the_packaged_base_where_the_run_used_one(tmp_path):
    from mllm_cl.backbones.presets import PACKAGED
    from mllm_cl.use.export import base_path

    packaged = base_path({"preset": "tiny-base", "path": None}, tmp_path / "out")
    assert packaged == (PACKAGED["tiny-base"] / "llm").resolve() and (packaged / "config.json").is_file()
    assert not (tmp_path / "out").exists()  # nothing written: the package ships it


# ---------------------------------------------------------------------------------------------------- cmoe
@pytest.mark.parametrize("steps_per_task, probe", [(3, 1), (300, 30)])
def test_cmoe_probes_a_share_of_the_task_budget_on_a_schedule_of_its_own(steps_per_task, probe):
    from mllm_cl.experts import ExpertSetup
    from mllm_cl.methods import LLaVACMoE
    from mllm_cl.system.budget import Budget

    options = yaml.safe_load((ROOT / "configs/methods/cmoe.yaml").read_text())["model"]["method"]["init_args"]
    assert options["probe_share"] == 0.1 and options["probe_steps"] is None
    init = {k: v for k, v in options.items() if k != "experts"}
    method = LLaVACMoE(ExpertSetup(["up_proj"]), **init)
    assert [p.name for p in method.phases(0, 2)] == ["train"]
    phases = method.phases(1, 2)
    budget = Budget(steps_per_task=steps_per_task, epochs_per_task=None, task_budgets=None, samples_per_step=None,
                    lr=1e-3, schedule="cosine", min_lr_ratio=0.0, warmup_steps=0, warmup_ratio=0.0,
                    max_phase_steps=None)
    plans = budget.plan_task(1, phases, ["a", "b"], lambda tasks, fraction: max(1, round(40 * fraction)),
                             batch_size=4, world_size=1)
    assert [p.name for p in phases] == ["probe", "train"] and phases[0].fraction == 0.1
    assert [p.steps for p in plans] == [probe, steps_per_task]
    # the probe is not part of the task's span: each phase runs its own schedule from its first step
    assert [(p.schedule.total, p.schedule.offset) for p in plans] == [(probe, 0), (steps_per_task, 0)]
    fixed = LLaVACMoE(ExpertSetup(["up_proj"]), probe_steps=7).phases(1, 2)
    assert budget.plan_task(1, fixed, ["a", "b"], lambda tasks, fraction: 10, batch_size=4,
                            world_size=1)[0].steps == 7
    assert [p.name for p in LLaVACMoE(ExpertSetup(["up_proj"]), probe_steps=0).phases(1, 2)] == ["train"]
