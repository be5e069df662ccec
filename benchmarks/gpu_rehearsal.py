"""A dress rehearsal of a 7B run on one GPU: every method through the real ``mllm-cl fit`` loop.

A LLaVA-1.5-7B-shaped model with random weights (Llama 32 layers x 4096, MLP 11008, 32 heads,
vocabulary 32064, untied head; a CLIP-style ViT at 336 px / patch 14, 24 layers x 1024, hence 576
image tokens, MLP 4096, 16 heads; the LLaVA-1.5 projector: 7.06B parameters) is built from the
``tiny-clip-llama`` preset with
``model.backbone_overrides``, initialised on the GPU (``--model.load_device``) and cast to bf16:
no weights, nothing downloaded. Each
method then runs a two-task sequence of the synthetic benchmark (``color`` -> ``classify``, written
by the project's generator, LLaVA-1.5's ``vicuna_v1`` template: ~790 tokens a sample with the byte
tokenizer) through ``mllm-cl fit`` with

    --trainer.accelerator gpu --trainer.devices 1 --trainer.precision bf16-mixed
    --model.gradient_checkpointing true

so expert expansion, freezing, the methods' statistics and task-end hooks, the stage evaluations
and the checkpoints all run as in a real run. Measured per method and phase:

- peak GPU memory of training: ``torch.cuda.max_memory_allocated``, reset when each phase's fit
  starts (the build's transient fp32 copy and the evaluations are not in it; ``--isolate`` also
  gives each method a fresh process);
- the median training step (forward, backward, optimizer step; from batch start to batch end,
  CUDA synchronized), leaving out each fit's first step when the fit has more than one;
- decoding throughput: the method's evaluation path (``mllm_cl.eval.evaluate.predict``, batched
  greedy decoding with a KV cache, the method's own routing) on ``--decode-prompts`` test prompts
  of the last task, ``--new-tokens`` each, after the run: new tokens / wall time (prefill and
  vision tower included);

and, as the reference row of the same run, PEFT's LoRA on ``lora_ft``'s modules and rank
(``peft_lora``, trained through the same loop by a small method class defined here). It prints
one table (method | peak GiB | step s | x PEFT step | decode tok/s | run s) and writes JSON.

    python benchmarks/gpu_rehearsal.py --out runs/gpu_rehearsal/rehearsal.json         # one H100: ~7 min
    python benchmarks/gpu_rehearsal.py --methods peft_lora lora_ft routing --steps 10  # a subset
    python benchmarks/gpu_rehearsal.py --tiny                                           # CPU smoke run, seconds

The full size needs CUDA and refuses to start without it; ``--tiny`` (a 2-layer, 128-wide model,
2 steps, 4 prompts) runs on the CPU and checks the script, not the GPU. Methods run one after the
other in this process (after each, the leftover GPU memory is checked and reported);
``--isolate`` runs each in a subprocess of this script instead. The routing gate phase runs
with one micro-batch per step here (PHATGOOSE's 32-batch accumulation would make each gate step
32 forward/backward passes), and every phase (a gate, a probe) is capped at ``--steps / 2``
steps a task. Each run's directory (config, results.json with its timings, logs) is kept under
``--workdir``, its output in ``WORKDIR/METHOD.log``.
"""

from __future__ import annotations

import argparse
import contextlib
import contextvars
import gc
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
import traceback
import weakref
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(Path(__file__).resolve().parent))
if __name__ == "__main__":  # the PEFT method's class path (gpu_rehearsal.PeftLoRA) names this very module
    sys.modules.setdefault("gpu_rehearsal", sys.modules["__main__"])

import lightning as L  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from memory import load_method  # noqa: E402  (benchmarks/memory.py: a method config, as mllm-cl fit reads it)

from mllm_cl.methods import Method  # noqa: E402

REFERENCE = "peft_lora"
METHODS = [REFERENCE, "lora_ft", "moelora", "individual", "routing", "same", "cram", "cmoe"]
TASKS = ["color", "classify"]
GiB = 2 ** 30

#: LLaVA-1.5-7B through the preset's fields: Vicuna-7B's Llama and a ViT-L/14 at 336 px.
LLAVA_7B = {"image_size": 336, "patch_size": 14, "vision_width": 1024, "vision_layers": 24, "vision_mlp": 4096,
            "vision_heads": 16, "llm_width": 4096, "llm_layers": 32, "heads": 32, "kv_heads": 32, "llm_mlp": 11008,
            "vocab_size": 32064, "tie_embeddings": False, "max_positions": 4096, "init_std": 0.02}
#: The smoke run's model: the preset's own 2-layer, 128-wide shape, 16 image tokens.
TINY = {"max_positions": 1024}

# What the ETA assumes on one H100 (rough; the run prints what it measured).
H100_TFLOPS = 350e12  # sustained bf16 throughput of a checkpointed step
FIXED_S = 20.0  # per method: build, zero-shot and stage evaluations, task-end hooks, checkpoints
PHASE_S = 3.0  # per fit: Trainer set-up and teardown, the optimizer's first step
PHASES = {"peft_lora": 2, "lora_ft": 2, "moelora": 2, "individual": 2, "routing": 4, "same": 2, "cram": 4, "cmoe": 3}
STEP_SHARE = {"routing": 2.0, "cmoe": 1.5}  # training steps as a multiple of --steps (a gate, a probe phase)


class PeftLoRA(Method):
    """The reference: PEFT's LoRA (``peft.inject_adapter_in_model``) on the language model's
    ``target_modules``, one adapter trained on every task in turn (as ``lora_ft``); fp32 adapter
    weights over the frozen base, as ``PeftModel`` keeps them and as mllm-cl's experts are.

    Args:
        target_modules: module names, PEFT's matching.
        rank: the LoRA rank (alpha = 2 x rank, as the experts' scale).
    """

    name = REFERENCE

    def __init__(self, target_modules: list[str], rank: int = 8) -> None:
        super().__init__(None)
        self.target_modules, self.rank = list(target_modules), rank

    def build(self, model):
        from peft import LoraConfig, inject_adapter_in_model

        config = LoraConfig(r=self.rank, lora_alpha=2 * self.rank, target_modules=self.target_modules)
        inject_adapter_in_model(config, model.language_model)
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.data = p.data.float()
                p.requires_grad_(True)
        return None


# ----------------------------------------------------------------------------------- measuring
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_bytes(device: torch.device) -> int:
    """CUDA: the allocator's peak since the last reset. CPU: the process's peak resident set
    (never reset: in one process it is the largest so far)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class StepClock(L.Callback):
    """Seconds per training step and peak memory, per phase name (``expert``, ``gate``, ...), over
    every fit of the run. A step is batch start to batch end (forward, backward, optimizer step),
    synchronized on CUDA; the batch's transfer and the data loading are outside it."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.phases: dict[str, dict] = {}
        self._phase: dict | None = None
        self._steps_in_fit = 0
        self._t0 = 0.0

    def on_train_start(self, trainer, pl_module) -> None:
        name = str(getattr(pl_module, "log_prefix", "train")).rsplit("/", 1)[-1]
        self._phase = self.phases.setdefault(name, {"steps": [], "first_steps": [], "peak_bytes": 0, "fits": 0,
                                                    "tokens": [], "padded": []})
        self._phase["fits"] += 1
        self._steps_in_fit = 0
        reset_peak(self.device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        mask = batch.get("attention_mask") if isinstance(batch, dict) else None
        if mask is not None:
            self._phase["tokens"].append(float(mask.sum()) / mask.shape[0])
            self._phase["padded"].append(int(mask.shape[1]))
        _sync(self.device)
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        _sync(self.device)
        dt = time.perf_counter() - self._t0
        (self._phase["first_steps"] if self._steps_in_fit == 0 else self._phase["steps"]).append(dt)
        self._steps_in_fit += 1

    def on_train_end(self, trainer, pl_module) -> None:
        self._phase["peak_bytes"] = max(self._phase["peak_bytes"], peak_bytes(self.device))

    def summary(self) -> dict[str, dict]:
        out = {}
        for name, p in self.phases.items():
            timed = p["steps"] or p["first_steps"]
            out[name] = {
                "median_step_s": statistics.median(timed) if timed else None,
                "steps_timed": len(timed), "fits": p["fits"],
                "first_steps_included": not p["steps"],  # every fit was one step long
                "first_step_s": statistics.median(p["first_steps"]) if p["first_steps"] else None,
                "step_s": [round(t, 4) for t in p["steps"]],
                "peak_gib": p["peak_bytes"] / GiB,
                "tokens_per_sample": statistics.mean(p["tokens"]) if p["tokens"] else None,
                "padded_length": statistics.mean(p["padded"]) if p["padded"] else None,
            }
        return out


@contextlib.contextmanager
def counting_generation(counts: dict):
    """Counts what ``predict``'s greedy decoding computes: prompts, prompt tokens, new tokens
    (every sequence of a batch decodes until the batch is done, so batch x steps)."""
    from mllm_cl.eval import evaluate

    original = evaluate.greedy_generate

    def counted(model, input_ids, attention_mask, *args, **kwargs):
        out = original(model, input_ids, attention_mask, *args, **kwargs)
        counts["prompts"] += out.shape[0]
        counts["new_tokens"] += out.numel()
        counts["prompt_tokens"] += int(attention_mask.sum())
        return out

    evaluate.greedy_generate = counted
    try:
        yield counts
    finally:
        evaluate.greedy_generate = original


def measure_decoding(module, datamodule, *, prompts: int, new_tokens: int, batch: int, device) -> dict:
    """``prompts`` test prompts of the last task through the method's evaluation path, timed."""
    from mllm_cl.data_modules import TaskSequence

    from mllm_cl.eval.evaluate import predict

    seq = TaskSequence(tasks=datamodule.tasks, test_limit=prompts, eval_batch_size=batch,
                       template=datamodule.template, max_length=datamodule.max_length, seed=datamodule.seed)
    spec = module.model.data_spec()
    seq.connect(module.tokenizer, module.image_processor(), spec.pop("num_image_tokens"), **spec)
    loader = seq.test_dataloader(seq.num_tasks - 1)
    counts = {"prompts": 0, "new_tokens": 0, "prompt_tokens": 0}
    module.model.eval()
    try:
        reset_peak(device)
        with counting_generation(counts):
            t0 = time.perf_counter()
            predict(module.model, module.tokenizer, loader, max_new_tokens=new_tokens,
                    context=lambda b: module.method.routing_context(b, training=False), desc="rehearsal decoding")
            _sync(device)
            seconds = time.perf_counter() - t0
    finally:
        module.model.train()
    return {**counts, "seconds": seconds, "tokens_per_s": counts["new_tokens"] / seconds,
            "peak_gib": peak_bytes(device) / GiB, "batch": batch, "max_new_tokens": new_tokens}


class Probe:
    """What one method's run measures; ``cli_class`` is ``mllm-cl fit``'s CLI with it attached."""

    def __init__(self, device: torch.device, args) -> None:
        self.device, self.args = device, args
        self.clock = StepClock(device)
        self.facts: dict = {}
        self.module_ref = None  # a weak reference: was the model freed once the run was over?

    def cli_class(self):
        from mllm_cl.fit import ContinualCLI

        probe = self

        class RehearsalCLI(ContinualCLI):
            def fit(self, model, datamodule, **kwargs) -> None:
                probe.module_ref = weakref.ref(model)
                probe.facts["params"] = sum(p.numel() for p in model.parameters())
                probe.facts["base_device"] = str(next(model.model.parameters()).device)
                if probe.device.type == "cuda":
                    probe.facts["allocated_at_start_gib"] = torch.cuda.memory_allocated(probe.device) / GiB
                self.trainer.callbacks.append(probe.clock)
                t0 = time.perf_counter()
                super().fit(model, datamodule, **kwargs)
                probe.facts["loop_s"] = time.perf_counter() - t0
                probe.facts["decode"] = measure_decoding(model, datamodule, prompts=probe.args.decode_prompts,
                                                         new_tokens=probe.args.new_tokens,
                                                         batch=probe.args.decode_batch, device=probe.device)

        return RehearsalCLI


@contextlib.contextmanager
def output_to(path: Path):
    """Everything written to stdout and stderr (file descriptors 1 and 2) goes to ``path``."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "ab") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


# ---------------------------------------------------------------------------------- the runs
def steps_per_task(args) -> int:
    return max(1, args.steps // len(TASKS))


def shape(args) -> dict:
    return {**(TINY if args.tiny else LLAVA_7B), **args.shape_overrides}


def base_config(args, data_dir: Path) -> dict:
    per_task = steps_per_task(args)
    return {
        "experiment": "gpu_rehearsal",
        "seed_everything": 0,
        "trainer": {"enable_progress_bar": False, "enable_model_summary": False, "log_every_n_steps": 1},
        "model": {"backbone": "tiny-clip-llama", "backbone_overrides": shape(args), "steps_per_task": per_task,
                  "max_phase_steps": per_task, "lr": 1e-4},
        "data": {"benchmark": str(data_dir), "order": TASKS, "train_limit": per_task * args.batch,
                 "test_limit": args.eval_limit, "batch_size": args.batch, "eval_batch_size": args.decode_batch,
                 "template": args.template, "max_length": args.max_length, "num_workers": args.workers},
    }


def method_config(name: str, work: Path) -> Path:
    if name != REFERENCE:
        return ROOT / "configs" / "methods" / f"{name}.yaml"
    experts = load_method("lora_ft").experts  # the reference adapts lora_ft's modules at its rank
    path = work / f"{REFERENCE}.yaml"
    spec = {"class_path": "gpu_rehearsal.PeftLoRA",
            "init_args": {"target_modules": list(experts.target_modules), "rank": experts.rank}}
    path.write_text(yaml.safe_dump({"model": {"method": spec}}))
    return path


#: Per method: options that keep a rehearsal step a training step of the method's usual shape.
METHOD_OPTIONS = {"routing": ["--model.method.init_args.gate_batch", "null"]}


def fit_args(name: str, args, device: torch.device, work: Path) -> list[str]:
    return ["--config", str(work / "base.yaml"), "--config", str(method_config(name, work)),
            "--trainer.accelerator", "gpu" if device.type == "cuda" else "cpu", "--trainer.devices", "1",
            "--trainer.precision", args.precision, "--model.gradient_checkpointing", "true",
            "--model.load_device", str(device),
            "--trainer.default_root_dir", str(work / name), *METHOD_OPTIONS.get(name, [])]


def run_method(name: str, args, device: torch.device, work: Path) -> dict:
    """One method's ``mllm-cl fit`` in this process; its measurements, or the error that stopped it."""
    from mllm_cl.system.build import build

    shutil.rmtree(work / name, ignore_errors=True)
    log = work / f"{name}.log"
    log.unlink(missing_ok=True)
    argv = fit_args(name, args, device, work)
    record: dict = {"method": name, "argv": ["mllm-cl", "fit", *argv], "log": str(log)}
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        record["left_by_earlier_gib"] = torch.cuda.memory_allocated(device) / GiB
    probe = Probe(device, args)
    t0 = time.perf_counter()
    try:
        with output_to(log):
            # In a context of its own: what the run leaves in context variables (jsonargparse keeps its
            # last parser there, and through it the CLI and the model) goes with it.
            contextvars.copy_context().run(build, argv, probe.cli_class())
    except BaseException as e:  # noqa: BLE001 -- a method that fails is a row that says why
        if isinstance(e, KeyboardInterrupt):
            raise
        record["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        with open(log, "a") as f:
            traceback.print_exc(file=f)
    record["run_s"] = time.perf_counter() - t0
    record["phases"] = probe.clock.summary()
    record.update(probe.facts)
    results = work / name / "results.json"
    if results.exists():
        record["timings"] = json.loads(results.read_text()).get("timings")
    if "error" not in record and not record["phases"]:
        record["error"] = "no training step was timed"
    steps = sum(sum(p["steps"]) + sum(p["first_steps"]) for p in probe.clock.phases.values())
    decode = (record.get("decode") or {}).get("seconds", 0.0)
    record["breakdown_s"] = {"training_steps": steps, "decoding": decode, "rest": record["run_s"] - steps - decode}
    model = probe.module_ref
    del probe  # with its clock, to which Lightning gave the module's bound log methods
    gc.collect()
    record["model_freed"] = model is None or model() is None
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return record


def run_isolated(name: str, args, work: Path) -> dict:
    """One method in a subprocess of this script (a fresh process: clean memory, clean CUDA context)."""
    out = work / f"{name}.record.json"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--methods", name, "--child-out", str(out),
           *forwarded(args)]
    t0 = time.perf_counter()
    try:
        done = subprocess.run(cmd, cwd=ROOT, timeout=args.method_timeout, capture_output=True, text=True)
    except subprocess.TimeoutExpired:
        return {"method": name, "error": f"timed out after {args.method_timeout} s", "run_s": args.method_timeout,
                "phases": {}}
    if out.exists():
        record = json.loads(out.read_text())[name]
        record["process_s"] = time.perf_counter() - t0  # the run and the process's start (imports, CUDA)
        return record
    tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
    return {"method": name, "error": f"exit {done.returncode}: {tail[0][:300]}",
            "run_s": time.perf_counter() - t0, "phases": {}}


def forwarded(args) -> list[str]:
    """The options a child run needs to measure what this run measures."""
    out = ["--steps", str(args.steps), "--batch", str(args.batch), "--decode-prompts", str(args.decode_prompts),
           "--new-tokens", str(args.new_tokens), "--decode-batch", str(args.decode_batch),
           "--eval-limit", str(args.eval_limit), "--workdir", str(args.workdir), "--device", args.device,
           "--precision", args.precision, "--template", args.template, "--max-length", str(args.max_length),
           "--workers", str(args.workers)]
    return out + (["--tiny"] if args.tiny else []) + (["--shape", *args.shape] if args.shape else [])


# ------------------------------------------------------------------------------- estimates
def estimate_s(name: str, args) -> float | None:
    """Seconds one method takes on one H100 at full size (a rough model; ``None`` at tiny size)."""
    if args.tiny:
        return None
    llm = 32 * (4 * 4096 ** 2 + 3 * 4096 * 11008) + 2 * 32064 * 4096
    tokens = args.batch * 790
    step = 6 * llm * tokens / H100_TFLOPS  # forward, recomputation, backward to the activations (frozen base)
    steps = STEP_SHARE.get(name, 1.0) * steps_per_task(args) * len(TASKS)
    decode = args.decode_prompts * (790 * 2 * llm / H100_TFLOPS) + math.ceil(args.decode_prompts / args.decode_batch) \
        * args.new_tokens * 0.04
    return FIXED_S + PHASES[name] * PHASE_S + steps * step + decode


# --------------------------------------------------------------------------------- the table
def rows(records: dict[str, dict]) -> list[dict]:
    """One row per method and phase (``routing/expert``, ``routing/gate``, ...); failed and skipped
    methods get a row that says so."""
    ref = records.get(REFERENCE, {}).get("phases", {}).get("train", {}).get("median_step_s")
    out = []
    for name, rec in records.items():
        phases = rec.get("phases") or {}
        decode = (rec.get("decode") or {}).get("tokens_per_s")
        if "error" in rec or "skipped" in rec or not phases:
            out.append({"label": name, "method": name, "phase": None, "run_s": rec.get("run_s"),
                        "error" if "skipped" not in rec else "skipped": rec.get("error") or rec.get("skipped")
                        or "nothing measured"})
            continue
        for phase, p in phases.items():
            step = p["median_step_s"]
            out.append({"label": name if len(phases) == 1 else f"{name}/{phase}", "method": name, "phase": phase,
                        "peak_gib": p["peak_gib"], "step_s": step, "ratio_to_peft": step / ref if ref else None,
                        "decode_tok_s": decode, "run_s": rec.get("run_s"), "steps_timed": p["steps_timed"],
                        "first_steps_included": p["first_steps_included"]})
    return out


def table(table_rows: list[dict]) -> str:
    lines = [f"{'method':<18} | {'peak GiB':>8} | {'step s':>8} | {'x PEFT step':>11} | {'decode tok/s':>12} | "
             f"{'run s':>6}", "-" * 79]
    shown = set()
    for r in table_rows:
        if "error" in r or "skipped" in r:
            what = f"failed: {r['error']}" if "error" in r else f"skipped: {r['skipped']}"
            lines.append(f"{r['label']:<18} | {what[:150]}")
            continue
        first = r["method"] not in shown  # decoding and the run's time: once per method
        shown.add(r["method"])
        ratio = f"{r['ratio_to_peft']:.3f}" if r["ratio_to_peft"] is not None else "-"
        mark = "*" if r["first_steps_included"] else " "
        decode = f"{r['decode_tok_s']:.1f}" if first and r["decode_tok_s"] is not None else ""
        run = f"{r['run_s']:.0f}" if first and r["run_s"] is not None else ""
        lines.append(f"{r['label']:<18} | {r['peak_gib']:8.2f} | {r['step_s']:7.3f}{mark} | {ratio:>11} | "
                     f"{decode:>12} | {run:>6}")
    if any(r.get("first_steps_included") for r in table_rows):
        lines.append("* every fit of this phase was one step long: its time includes the fit's first step")
    return "\n".join(lines)


def progress_line(i: int, n: int, record: dict, elapsed: float, to_go: float | None) -> str:
    name = record["method"]
    if "skipped" in record:
        what = f"skipped ({record['skipped']})"
    elif "error" in record:
        what = f"failed in {record['run_s']:.0f} s ({record['error'][:120]})"
    else:
        b = record.get("breakdown_s", {})
        what = (f"done in {record['run_s']:.0f} s (training steps {b.get('training_steps', 0):.0f} s, decoding "
                f"{b.get('decoding', 0):.0f} s, the rest {b.get('rest', 0):.0f} s)")
        if "process_s" in record:
            what += f", {record['process_s']:.0f} s with the process's start"
    line = f"  [{i}/{n}] {name}: {what}; {elapsed:.0f} s so far"
    if to_go is not None:
        line += f", ~{to_go:.0f} s to go"
    if record.get("left_by_earlier_gib", 0) > 0.5:
        line += f"; started with {record['left_by_earlier_gib']:.1f} GiB left by earlier methods (--isolate avoids it)"
    return line


# ------------------------------------------------------------------------------------ main
def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=None, choices=METHODS, metavar="METHOD",
                    help=f"methods to run, in this order (default: all: {' '.join(METHODS)}); "
                         f"{REFERENCE} is the PEFT reference the ratios divide by")
    ap.add_argument("--steps", type=int, default=None,
                    help="training steps of each phase over the two tasks (default 20; --tiny: 2)")
    ap.add_argument("--batch", type=int, default=None, help="samples per step (default 8; --tiny: 4)")
    ap.add_argument("--decode-prompts", type=int, default=None,
                    help="prompts decoded after the run (default 64; --tiny: 4)")
    ap.add_argument("--new-tokens", type=int, default=16, help="new tokens per decoded prompt")
    ap.add_argument("--decode-batch", type=int, default=None,
                    help="prompts per generation batch (default 16; --tiny: 4)")
    ap.add_argument("--eval-limit", type=int, default=None,
                    help="test prompts per task in the loop's own stage evaluations (default 8; --tiny: 2)")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer, 128-wide model: a smoke run of the script (CPU)")
    ap.add_argument("--shape", nargs="+", default=[], metavar="FIELD=VALUE",
                    help="preset fields replaced on top of the chosen shape (e.g. llm_layers=4)")
    ap.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda, or cpu with --tiny")
    ap.add_argument("--precision", default="bf16-mixed", help="trainer.precision")
    ap.add_argument("--template", default="vicuna_v1", help="chat template (vicuna_v1: LLaVA-1.5's)")
    ap.add_argument("--max-length", type=int, default=1024, help="longest token sequence kept")
    ap.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds: a method whose estimate would end the run past this is skipped "
                         "(default 480 at full size, none with --tiny; 0: no budget)")
    ap.add_argument("--workdir", type=Path, default=ROOT / "runs" / "gpu_rehearsal",
                    help="run directories, logs and the synthetic data (each method's directory is replaced)")
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON of every measurement, rewritten after each method (default: WORKDIR/rehearsal.json)")
    ap.add_argument("--isolate", action="store_true", help="each method in its own subprocess")
    ap.add_argument("--method-timeout", type=int, default=300, help="--isolate: seconds before a method is stopped")
    ap.add_argument("--child-out", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    small = {"steps": 2, "batch": 4, "decode_prompts": 4, "decode_batch": 4, "eval_limit": 2, "budget": 0}
    full = {"steps": 20, "batch": 8, "decode_prompts": 64, "decode_batch": 16, "eval_limit": 8, "budget": 480}
    for key, value in (small if args.tiny else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.device = args.device or ("cpu" if args.tiny else "cuda")
    args.methods = args.methods or list(METHODS)
    if min(args.steps, args.batch, args.decode_prompts, args.new_tokens, args.decode_batch, args.eval_limit) < 1:
        ap.error("--steps, --batch, --decode-prompts, --new-tokens, --decode-batch and --eval-limit must be >= 1")
    args.shape_overrides = {}
    for item in args.shape:
        key, sep, value = item.partition("=")
        if not sep:
            ap.error(f"--shape {item!r}: give FIELD=VALUE")
        args.shape_overrides[key] = yaml.safe_load(value)
    return args


def device_line(device: torch.device) -> str:
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory / GiB
        return f"{torch.cuda.get_device_name(device)} ({total:.0f} GiB)"
    return "cpu (a smoke run: the numbers check the script, not a GPU)"


def main(argv=None) -> int:
    args = parse(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_rehearsal.py: the full-size rehearsal needs a CUDA GPU and torch sees none; nothing was run. "
              "`--tiny` runs a 2-layer model on the CPU to check the script.", file=sys.stderr)
        return 2
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    args.workdir = work
    data_dir = work / "data"
    from mllm_cl.data.synth import ensure

    ensure(data_dir, tasks=TASKS, train_size=steps_per_task(args) * args.batch,
           test_size=max(args.decode_prompts, args.eval_limit), image_size=48, seed=0, progress=False)
    (work / "base.yaml").write_text(yaml.safe_dump(base_config(args, data_dir), sort_keys=False))

    if args.child_out is not None:  # one method for a parent run under --isolate
        records = {name: run_method(name, args, device, work) for name in args.methods}
        args.child_out.write_text(json.dumps(records, indent=1))
        return 0

    estimates = {name: estimate_s(name, args) for name in args.methods}
    eta = sum(estimates.values()) if all(v is not None for v in estimates.values()) else None
    print(f"gpu_rehearsal: {device_line(device)}, torch {torch.__version__}")
    size = "the tiny preset" if args.tiny else "LLaVA-1.5-7B's shape (random weights, bf16)"
    print(f"  model: {size}{' with ' + str(args.shape_overrides) if args.shape_overrides else ''}; {args.steps} steps "
          f"a phase over {len(TASKS)} tasks ({' -> '.join(TASKS)}), {args.batch} samples a step, {args.precision}, "
          f"gradient checkpointing; decoding {args.decode_prompts} prompts x {args.new_tokens} new tokens, "
          f"{args.decode_batch} a batch")
    print(f"  methods: {' '.join(args.methods)}")
    if eta is not None:
        print(f"  ETA ~{eta / 60:.1f} min on one H100 ({', '.join(f'{n} {s:.0f} s' for n, s in estimates.items())}; "
              f"a rough model, rescaled by what each method measures)" +
              (f"; methods that would end past {args.budget:.0f} s are skipped" if args.budget else ""))
    out = args.out or work / "rehearsal.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"device": device_line(device), "torch": torch.__version__, "tiny": args.tiny, "shape": shape(args),
              "tasks": TASKS, "steps_per_phase": args.steps, "steps_per_task": steps_per_task(args),
              "batch": args.batch, "precision": args.precision, "gradient_checkpointing": True,
              "template": args.template, "isolate": args.isolate,
              "decode": {"prompts": args.decode_prompts, "new_tokens": args.new_tokens, "batch": args.decode_batch},
              "memory": "cuda max_memory_allocated, reset at each fit's start" if device.type == "cuda"
              else "cpu: the process's peak resident set (not reset between methods run in one process)",
              "eta_s": eta, "estimates_s": estimates, "budget_s": args.budget or None}
    records, t_start, scale = {}, time.perf_counter(), 1.0
    for i, name in enumerate(args.methods):
        elapsed = time.perf_counter() - t_start
        if args.budget and eta is not None and elapsed + scale * estimates[name] > args.budget:
            records[name] = {"method": name, "skipped": f"over the {args.budget:.0f} s budget after {elapsed:.0f} s "
                                                        f"(estimate {scale * estimates[name]:.0f} s)", "phases": {}}
        else:
            records[name] = run_isolated(name, args, work) if args.isolate else run_method(name, args, device, work)
        ran = [n for n in records if "run_s" in records[n]]
        if eta is not None and ran:  # the estimates, rescaled by what the methods so far took against theirs
            scale = sum(records[n].get("process_s", records[n]["run_s"]) for n in ran) / sum(estimates[n] for n in ran)
        left = args.methods[i + 1:]
        to_go = scale * sum(estimates[n] for n in left) if eta is not None and left else None
        print(progress_line(i + 1, len(args.methods), records[name], time.perf_counter() - t_start, to_go), flush=True)
        report.update(total_s=time.perf_counter() - t_start, rows=rows(records), methods=records)
        out.write_text(json.dumps(report, indent=1))  # after every method: a stopped run keeps what it measured
    print()
    print(table(report["rows"]))
    tokens = [p["tokens_per_sample"] for r in records.values() for p in (r.get("phases") or {}).values()
              if p.get("tokens_per_sample")]
    if tokens:
        print(f"{statistics.mean(tokens):.0f} tokens a training sample (real tokens, mean over steps)")
    for name, r in records.items():
        if "error" in r:
            print(f"{name}: {r['error']} (log: {work / (name + '.log')})")
        elif r.get("model_freed") is False:
            print(f"{name}: its model was still referenced after the run: later methods' peaks may include it "
                  "(--isolate runs each method in its own process)")
    print(f"total {report['total_s']:.0f} s; wrote {out}")
    return 0 if all("error" not in r and "skipped" not in r for r in records.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
