"""Activation checkpointing: the same loss and gradients as without it, for every method, in a real fit.

The fit itself runs with ``model.gradient_checkpointing: true``; ``checkpoint_parity.GradientParity``
compares, on the first batch of every phase (and on a mixed-task batch and under the oracle's routing
in the last phase), the loss and every trainable gradient with checkpointing off and on.
"""

import json
from pathlib import Path

import pytest

from mllm_cl.fit import main as fit_main

ROOT = Path(__file__).resolve().parents[2]
EXTRA = {"routing": ["--model.method.init_args.gate_steps", "2", "--model.method.init_args.gate_batch", "null"],
         "cmoe": ["--model.method.init_args.probe_steps", "2", "--model.method.init_args.vae_steps", "20"],
         "same": ["--model.method.init_args.warmup_steps", "1", "--model.method.init_args.refresh_every", "2"]}
# routing-CL's oracle is left out: in its training phases nothing trainable lies on the oracle's path (the
# gates are bypassed; the task's own expert gets its oracle route when the task ends), so no backward runs.
ROUTED = ("same", "cram", "cmoe")
ORACLE = ["--model.method.init_args.route_by", "task_id"]  # evaluated (and checked) under the oracle's routing
#: every method that trains, and the phases it trains over two tasks (multitask: one joint fit at the end;
#: cmoe: no probe on the first task)
PHASES = {"lora_ft": 2, "moelora": 2, "multitask": 1, "individual": 2, "routing": 4, "same": 2, "cram": 4, "cmoe": 3}


@pytest.mark.parametrize("method", sorted(PHASES))
def test_checkpointing_keeps_loss_and_gradients(bench, tmp_path, method):
    import checkpoint_parity

    checkpoint_parity.RESULTS.clear()
    fit_main(["--config", str(ROOT / "configs/micro.yaml"), "--config", str(ROOT / f"configs/methods/{method}.yaml"),
              "--data.benchmark", str(bench), "--trainer.default_root_dir", str(tmp_path / "run"),
              "--model.gradient_checkpointing", "true", "--trainer.callbacks+", "checkpoint_parity.GradientParity",
              *EXTRA.get(method, []), *(ORACLE if method in ROUTED else [])])
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["completed_tasks"] == 2
    rows = checkpoint_parity.RESULTS
    assert len({r[0] for r in rows}) == PHASES[method], rows
    cases = {r[1] for r in rows}
    assert {"phase batch", "tasks mixed"} <= cases
    if method in ROUTED:
        assert "oracle routing" in cases
    for phase, case, off, on, worst, n in rows:
        assert n > 0, (phase, case)
        assert abs(on - off) <= 1e-6 * abs(off), (phase, case, off, on)
        assert worst <= 1e-6, (phase, case, worst)
