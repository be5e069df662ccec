"""Ask a finished (or interrupted) run's model: one image and prompt, or a whole test file.

    mllm-cl predict RUN --image cat.png --prompt "What colour is it?" [--task NAME] [--stage N]
    mllm-cl predict RUN --input test.jsonl --out preds.jsonl [--scorer exact_match]
    mllm-cl predict RUN --input TASK --out preds.jsonl        (a task of the run: its own test set)

The model of stage N (default: the last) is rebuilt from the run directory alone
(``mllm_cl.system.restore``: config.yaml, the backbone it names, the adapters and method
state of checkpoint task_NN). Each batch is routed exactly as the run's evaluation routed
it (the method's routing context: a task locator, a task prior, instruction groups and
centroids, gates) and decoded greedily with the run's chat template, batched as the
evaluation batches (``data.eval_batch_size``). One prompt prints its answer and the
routing decision (``mllm_cl.use.decision``); a test file writes the predictions JSONL of
the run directory (question_id, prompt, text, answer) and, with ``--scorer`` (default for
a task of the run: its scorer), prints the score, which for a task of the run is the number
its accuracy matrix holds at that stage.

Methods that route by the true task (``individual``, cmoe's oracle) need ``--task NAME``
for a prompt or a file; a task name given as ``--input`` carries its own.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mllm_cl.data.formats import TestRecord, load_test_records
from mllm_cl.errors import UserError
from mllm_cl.eval.rules import CORPUS_RULES, RULES
from mllm_cl.use.quiet import restore_quietly

HELP = "answer a prompt (or a test file) with a run's model, routed as its evaluation routes; print the routing"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", metavar="RUN", help="the run directory (holds config.yaml, results.json, checkpoints/)")
    p.add_argument("--stage", type=int, default=None, help="the model after this many tasks (default: the last)")
    p.add_argument("--image", default=None, help="an image file for --prompt")
    p.add_argument("--prompt", default=None, help="one instruction to answer (with --image, about that image)")
    p.add_argument("--input", default=None, metavar="TEST",
                   help="a test file (JSON list or JSONL of question_id, image, text, answer), or a task name of "
                        "the run")
    p.add_argument("--out", default=None, help="with --input: where to write the predictions JSONL")
    p.add_argument("--image-root", default=None,
                   help="with a --input file: the folder its image paths are relative to (default: the file's folder)")
    p.add_argument("--task", default=None,
                   help="the task the prompts belong to (a task name of the run), for methods that route by the true "
                        "task; other methods ignore it except for counting their choice's accuracy")
    p.add_argument("--scorer", default=None, help="score the predictions with this rule (see docs/scorers.md)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="generation budget (default: the task's, else 16)")
    p.add_argument("--show-routing", type=int, default=0, metavar="N",
                   help="with --input: also print the answer and routing decision of the first N rows")
    p.add_argument("--device", default=None, help="run on this device (cpu, cuda, ...; default: where it loads)")
    p.add_argument("--verbose", action="store_true",
                   help="also print what rebuilding the run prints (the seed, the check of the task files)")


def _check(args: argparse.Namespace) -> None:
    single, many = args.prompt is not None, args.input is not None
    if single == many:
        raise UserError("mllm-cl predict: give either --prompt TEXT (with --image PATH) or --input TEST --out FILE")
    if args.image is not None and not single:
        raise UserError("mllm-cl predict: --image goes with --prompt; a test file names its images itself")
    if many and args.out is None:
        raise UserError("mllm-cl predict: --input needs --out FILE for the predictions JSONL")
    if single and (args.out is not None or args.scorer is not None):
        raise UserError("mllm-cl predict: --out and --scorer go with --input (one prompt has no answer to score)")
    if args.image is not None and not Path(args.image).is_file():
        raise FileNotFoundError(f"--image {args.image} does not exist")
    if args.scorer is not None:  # before the model is built
        if args.scorer not in RULES and args.scorer not in CORPUS_RULES:
            raise UserError(f"mllm-cl predict: unknown --scorer {args.scorer!r}; scorers: "
                            f"{', '.join(sorted({*RULES, *CORPUS_RULES}))}")


def needs_task_id(module) -> bool:
    """Whether the method's evaluation routes by the true task id (a ``TaskRouter``, cmoe's oracle)."""
    from mllm_cl.experts import TaskRouter, expert_layers  # heavy: torch; the command loads without it

    if getattr(module.method, "route_by", None) == "task_id":
        return True
    layers = expert_layers(module.model).values()
    return any(isinstance(r, TaskRouter) for layer in layers for r in layer.routers.values())


def _task_index(dm, name: str | None, what: str) -> int | None:
    """The index of task ``name`` (``-1 - j``: general task ``j``); ``None`` for none."""
    if name is None:
        return None
    names = dm.task_names
    general = [g.name for g in dm.general_tasks]
    if name in names:
        return names.index(name)
    if name in general:
        return -1 - general.index(name)
    raise UserError(f"mllm-cl predict: {what} {name!r} is not a task of this run; tasks: {', '.join(names + general)}")


def _task_id(index: int | None) -> int:
    """The task id the samples carry: -1 for none and for a general task (no trained task)."""
    return -1 if index is None or index < 0 else index


def _dataset(args: argparse.Namespace, dm):
    """(dataset, task index or None, task spec or None) for the arguments."""
    from mllm_cl.data.datasets import PromptDataset  # heavy: torch; the command loads without it

    encoder = dm._need_model()
    if args.prompt is not None:
        index = _task_index(dm, args.task, "--task")
        image = None if args.image is None else Path(args.image)
        prompt = args.prompt if image is None or "<image>" in args.prompt else "<image>\n" + args.prompt
        record = TestRecord("prompt", image, prompt, "", {}, "--prompt")
        return PromptDataset([record], encoder, dm.images, task_id=_task_id(index)), index, \
            None if index is None else dm.task_spec(index)
    if Path(args.input).suffix not in (".json", ".jsonl") and not Path(args.input).exists():
        index = _task_index(dm, args.input, "--input")
        if args.task is not None and _task_index(dm, args.task, "--task") != index:
            raise UserError(f"mllm-cl predict: --input {args.input} is a task of the run; --task {args.task} "
                            "contradicts it (leave --task out)")
        return dm.test_dataset(index), index, dm.task_spec(index)
    index = _task_index(dm, args.task, "--task")
    root = Path(args.image_root) if args.image_root else Path(args.input).parent
    records = load_test_records(args.input, root, on_bad_sample=dm.on_bad_sample)
    if not records:
        raise UserError(f"{args.input}: no test rows to predict")
    data = PromptDataset(records, encoder, dm.images, task_id=_task_id(index), on_bad_sample=dm.on_bad_sample)
    return data, index, None if index is None else dm.task_spec(index)


def run(args: argparse.Namespace) -> int:
    _check(args)
    # heavy: torch; the command loads without it
    from torch.utils.data import DataLoader

    from mllm_cl.eval.evaluate import predict, score, write_predictions
    from mllm_cl.use.decision import decisions, describe

    restored = restore_quietly(args.run, args.stage, device=args.device, verbose=args.verbose)
    module, dm, results = restored.module, restored.datamodule, restored.results
    method = module.method
    data, index, spec = _dataset(args, dm)
    if index is None and needs_task_id(module):
        raise UserError(f"mllm-cl predict: {method.name} routes each sample by its true task; give --task NAME "
                        f"(one of {', '.join(dm.task_names)})")
    if index is not None and index >= restored.stage and not method.one_row:
        print(f"mllm-cl predict: note: task {dm.task_names[index]} comes after stage {restored.stage}; "
              "the model has not trained on it yet")
    max_new = args.max_new_tokens or (spec.max_new_tokens if spec is not None else 16)
    loader = DataLoader(data, batch_size=dm.eval_batch_size, collate_fn=dm.eval_collate)
    found: list[dict] = []
    single = args.prompt is not None
    show = 1 if single else max(0, args.show_routing)

    def context(batch):
        ctx = method.routing_context(batch, training=False)
        if len(found) < show:  # the decision of exactly this context, recorded before the generation uses it
            found.extend(decisions(module, batch, ctx, dm.task_names)[:show - len(found)])
        return ctx

    method.stage_metrics(dm.task_names)  # the method's choice counters start empty
    print(f"mllm-cl predict: {restored.module.method.name} at stage {restored.stage:02d} of {Path(args.run)}")
    rows = predict(module.model, module.tokenizer, loader, max_new_tokens=max_new, context=context,
                   desc="predict")
    own = method.stage_metrics(dm.task_names) or {}
    if single:
        print(f"answer: {rows[0]['text']}")
        print("routing:")
        print(describe(found[0]))
        return 0
    for row, decision in zip(rows, found, strict=False):
        print(f"{row['question_id']}: {row['prompt']!r} -> {row['text']!r} (answer {row['answer']!r})")
        print(describe(decision))
    write_predictions(rows, Path(args.out))
    print(f"mllm-cl predict: {len(rows)} predictions in {args.out}")
    if not rows:
        raise UserError(f"{args.input}: every row was skipped as bad input; nothing to score")
    for key, value in own.items():
        if isinstance(value, dict) and key.endswith("accuracy"):
            print(f"  {key.replace('_', ' ')} (%): " + ", ".join(f"{t} {v}" for t, v in value.items()))
        elif isinstance(value, dict) and key.endswith("confusion"):
            print(f"  {key.replace('_', ' ')} (true task: chosen counts): {value}")
    scorer = args.scorer or (spec.scorer if spec is not None else None)
    if scorer is not None:
        modes = {t["name"]: t.get("mode", "official") for t in results["tasks"]}
        mode = modes.get(spec.name if spec is not None else "", next(iter(modes.values()), "official"))
        value = round(score(rows, scorer, mode), 4)
        print(f"score ({scorer}, {mode}): {value}")
    return 0
