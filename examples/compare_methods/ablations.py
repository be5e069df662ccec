"""Ablations of SAME, CRAM, LLaVA-CMoE and routing-based CL on the shapes sequence, canonical order, seed 0.

    python examples/compare_methods/ablations.py             # runs what is missing, then the table

Each row of ``ABLATIONS`` is a method config plus `mllm-cl fit` overrides, trained into
``RUNS/ablations/NAME``. Each row of ``EVALUATED`` changes only how a method is evaluated: it is the
shapes sweep's own run of that method (``run.py``'s ``RUNS/shapes/ORDER-s0/METHOD``) evaluated again with
those options (``mllm-cl evaluate``, no training) into ``RUNS/ablations/NAME``; run.py's sweep must have
run that method first. The oracle rows (each routed method with ``route_by: task_id``) are run.py's
``METHOD_oracle`` rows of that sweep. The table (``RUNS/ablations.md``) puts the rows next to that sweep
when it is there, so each method sits beside its own baselines. The ablations run on the shapes sequence in
its config's canonical order, seed 0 (``--experiment shapes=CONFIG`` replaces the config).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import ROOT, ROWS, canonical_order, fit, parse_common, publish, reevaluate, sweep_dir

FFN = "[gate_proj, up_proj, down_proj]"
#: name -> (method config, overrides)
ABLATIONS: dict[str, tuple[str, list[str]]] = {
    # SAME's own baseline: MoELoRA on SAME's modules with SAME's pool (4 experts of rank 8).
    "moelora_ffn_4x8": ("moelora", ["--model.method.init_args.experts.target_modules", FFN,
                                    "--model.method.init_args.num_experts", "4",
                                    "--model.method.init_args.experts.rank", "32"]),
    "same_spectral_only": ("same", ["--model.method.init_args.curvature_scaling", "false",
                                    "--model.method.init_args.adaptive_activation", "false"]),
    "same_spectral_curvature": ("same", ["--model.method.init_args.adaptive_activation", "false"]),
    "same_no_prior": ("same", ["--model.method.init_args.prior", "none"]),
    # Individual on SAME's modules and rank: one expert per task, trained apart, chosen by the true task id.
    "individual_ffn_r8": ("individual", ["--model.method.init_args.experts.target_modules", FFN]),
    # CRAM: without the orthogonality penalty, with a fixed rank, and individual at r_max on CRAM's modules.
    "cram_no_penalty": ("cram", ["--model.method.init_args.orth_weight", "0"]),
    "cram_fixed_rank": ("cram", ["--model.method.init_args.fixed_rank", "true"]),
    "cram_sigma_absolute": ("cram", ["--model.method.init_args.bandwidth", "absolute"]),  # the authors' sigma 2
    "cram_novelty_scaled": ("cram", ["--model.method.init_args.novelty_scaling", "dimension"]),
    "individual_attn_r9": ("individual", ["--model.method.init_args.experts.target_modules",
                                          "[q_proj, k_proj, v_proj, o_proj]",
                                          "--model.method.init_args.experts.rank", "9"]),
    # Routing-based CL: the cheaper gate budget (the sequence's lr, 32 samples a step), a smaller expert
    # scale (docs/methods/routing.md compares it with PHATGOOSE's), the null expert.
    "routing_gate_fast": ("routing", ["--model.method.init_args.gate_batch", "null",
                                      "--model.method.init_args.gate_lr", "null",
                                      "--model.method.init_args.gate_warmup", "null"]),
    "routing_scale16": ("routing", ["--model.method.init_args.expert_scale", "0.0625"]),
    "routing_null": ("routing", ["--model.method.init_args.null_expert", "true"]),
    # LLaVA-CMoE: the locators; individual on cmoe's modules and rank.
    "cmoe_gaussian": ("cmoe", ["--model.method.init_args.locator", "gaussian"]),
    "cmoe_vae": ("cmoe", ["--model.method.init_args.locator", "vae"]),  # the paper's PTL
    # What PGKE's growth threshold buys: alpha 0 / 0.5 / 1 (= cmoe) / 2.
    **{f"cmoe_alpha{a}": ("cmoe", ["--model.method.init_args.alpha", a]) for a in ("0", "0.5", "2")},
    "individual_up_down_r8": ("individual", ["--model.method.init_args.experts.target_modules",
                                             "[up_proj, down_proj]"]),
}
#: name -> (the sweep's method whose run is evaluated again, evaluation-only `mllm-cl fit` options)
EVALUATED: dict[str, tuple[str, list[str]]] = {
    # CRAM routing a whole evaluation batch by its mean (leaks task identity); each sample to its task's slot
    # alone (run.py's cram_oracle routes each sample as its task trained, beside its group's older slots).
    "cram_eval_batch": ("cram", ["--model.method.init_args.eval_routing", "batch"]),
    "cram_task_slot": ("cram", ["--model.method.init_args.route_by", "task_slot"]),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", choices=sorted({**ABLATIONS, **EVALUATED}),
                   help="run these rows only (default: all)")
    args, runs, fit_args = parse_common(p, argv)
    experiment = args.experiments["shapes"]
    order = canonical_order(experiment)
    sweep = sweep_dir(runs / "shapes", order, 0)
    t0 = time.time()
    if not args.compare_only:
        for name in args.only or [*ABLATIONS, *EVALUATED]:
            if name in EVALUATED:
                method, options = EVALUATED[name]
                if not (sweep / method / "results.json").is_file():
                    raise SystemExit(f"ablations: {name} evaluates {sweep / method} again, which is not there; "
                                     f"run `python examples/compare_methods/run.py --sequence shapes --methods "
                                     f"{method}` (with the same --runs) first")
                reevaluate(sweep / method, runs / "ablations" / name, options)
                continue
            method, overrides = ABLATIONS[name]
            fit(runs / "ablations" / name, ROOT / "configs" / "methods" / f"{method}.yaml", order, 0,
                str(experiment), None, overrides + fit_args)

    from mllm_cl.report.compare import collect, table

    found = collect([sweep, runs / "ablations"])
    if not found:
        raise SystemExit(f"ablations: no finished runs under {runs}")
    text = table(found, order=ROWS + [*ABLATIONS, *EVALUATED])
    header = ("The shapes sequence, canonical order, seed 0; rows: ABLATIONS and EVALUATED in "
              "examples/compare_methods/ablations.py")
    (runs / "ablations.md").write_text(f"{header}\n\n{text}\n")
    print(text)
    if args.results is not None:
        command = "python examples/compare_methods/ablations.py " + " ".join(argv if argv is not None else sys.argv[1:])
        publish(args.results, "ablations", command, f"## Ablations\n\n{header}.\n\n{text}")
    print(f"ablations: {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
