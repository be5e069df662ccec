"""Stage evaluation: greedy generation on every seen task's test set, scored per task.

The model is put in eval mode once per stage and every requested task is
scored in that stage. Predictions go to ``stage_NN/TASK.jsonl`` as
``{"question_id", "prompt", "text", "answer"}`` so any external scorer can
re-score them. Generation is batched greedy decoding with a KV cache
(``generation.greedy_generate``); the method supplies each batch's routing
context (e.g. true task ids for ``individual``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mllm_cl.console import ProgressLine, duration
from mllm_cl.data.collate import batch_to
from mllm_cl.distributed import is_writer
from mllm_cl.eval.common import answers
from mllm_cl.eval.generation import greedy_generate
from mllm_cl.eval.rules import CORPUS_RULES, get_rule
from mllm_cl.eval.sharding import gather_rows
from mllm_cl.experts import RoutingContext


@torch.no_grad()
def predict(model, tokenizer, loader, *, max_new_tokens: int,
            context: Callable[[dict[str, Any]], RoutingContext | None], desc: str = "",
            on_skipped: Callable[[list[str]], Any] | None = None) -> list[dict[str, Any]]:
    """Greedy answers for every prompt of ``loader``'s dataset, in dataset order (all ranks' shards).

    Rows a batch left out as bad input (``on_bad_sample: skip``) have no answer; their messages
    go to ``on_skipped`` (this rank's only), so that the caller can count and report them."""
    rows = []
    device = next(model.parameters()).device
    line = ProgressLine(enabled=is_writer())  # in place on a terminal, a line every 30 s in a log
    try:
        total = f"/{len(loader)}"
    except TypeError:  # an iterable loader without a length
        total = ""
    for k, batch in enumerate(loader, 1):
        line.update(f"{desc or 'evaluating'} · batch {k}{total} · {duration(line.elapsed())}")
        if on_skipped is not None and batch.get("skipped"):
            on_skipped(batch["skipped"])
        if batch.get("empty"):
            continue
        # On the model's device once: the routing context (a task locator's own forward) reads it too.
        batch = batch_to(batch, device)
        out = greedy_generate(
            model,
            batch["input_ids"],
            batch["attention_mask"],
            batch["pixel_values"],
            max_new_tokens=max_new_tokens,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            context=context(batch),
            model_inputs=batch.get("model_inputs"),
        )
        texts = tokenizer.batch_decode(out, skip_special_tokens=True)
        for record, text, index in zip(batch["records"], texts, batch["index"], strict=False):
            rows.append({"question_id": record["question_id"], "prompt": record["text"], "text": text.strip(),
                         "answer": record["answer"], "record": record, "index": index})
    line.close(f"{desc or 'evaluating'} · {len(rows)} prompts · {duration(line.elapsed())}")
    return gather_rows(rows)  # under several processes: every rank's shard, in dataset order


def score(rows: list[dict[str, Any]], scorer: str, mode: str = "official") -> float:
    """Mean per-sample score in percent (0 for an empty test set is refused); a corpus-level
    scorer (UCIT's captions) gives its ``Average`` over all rows instead."""
    if not rows:
        raise ValueError("no predictions to score")
    if scorer in CORPUS_RULES:
        scores = CORPUS_RULES[scorer]([r["text"] for r in rows], [answers(r["record"]) for r in rows], mode=mode)
        return float(scores["Average"])
    rule = get_rule(scorer)
    return 100.0 * sum(rule(r["text"], r["record"], mode=mode) for r in rows) / len(rows)


def write_predictions(rows: list[dict[str, Any]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps({k: r[k] for k in ("question_id", "prompt", "text", "answer")},
                               ensure_ascii=False) + "\n")
