"""Every per-sample scoring rule, by name: ``rule(prediction, record, *, mode="official") -> float`` in [0, 1].

``record`` is a test-file row (``question_id``, ``text`` (the prompt),
``answer`` (a string or list of strings) and, for grounding, ``answer_bbox``
and ``size``). ``RULES`` maps each rule's name (a task's ``scorer``) to its
function; ``MODES`` are ``official`` (the benchmark's published script,
quirks included) and ``clean`` (quirks fixed). Each rule's docstring lists the
quirks it reproduces and what ``clean`` changes; ``docs/scorers.md`` has the
table.

Benchmark rules are named after the benchmark (and the codebase whose script
they reproduce when codebases differ): ``coin_*`` (zackschen/CoIN),
``mcitlib_*`` / ``ucit_*`` / ``mllm_dcl_*`` (Ghy0501/MCITlib), ``prism_*``
(Zhen-Hao-Xie/Prism), ``docvqa_anls`` (the DocVQA challenge script),
``chartqa_relaxed`` (pix2struct). The generic rules ``exact_match``,
``option_accuracy``, ``substring_match`` and ``grounding_iou`` have no
published script to follow: they apply one careful rule in both modes.

Caption scoring is corpus-level (CIDEr needs every reference), so it is not
a per-sample rule: ``CORPUS_RULES`` maps its names to ``caption_average``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mllm_cl.eval.anls import anls_clean, anls_official
from mllm_cl.eval.boxes import iou, parse_box
from mllm_cl.eval.captions import caption_average
from mllm_cl.eval.coin import (
    coin_gqa,
    coin_grounding,
    coin_imagenet,
    coin_ocrvqa,
    coin_scienceqa,
    coin_textvqa,
    coin_vizwiz,
    coin_vqav2,
    mcitlib_grounding,
    mcitlib_scienceqa,
    prism_grounding,
    prism_scienceqa,
    textvqa_soft_accuracy,
)
from mllm_cl.eval.common import MODES, answers, check_mode, contains_words, qid
from mllm_cl.eval.mcitlib import (
    UCIT_TASK_RULES,
    mllm_dcl_ad,
    mllm_dcl_fin,
    mllm_dcl_med,
    mllm_dcl_rs,
    mllm_dcl_sci,
    ucit_exact_match,
)
from mllm_cl.eval.options import option_letter
from mllm_cl.eval.relaxed import DEFAULT_TOLERANCE, relaxed_clean, relaxed_official

_check_mode = check_mode  # the name earlier code used


# --------------------------------------------------------------------------- generic rules


def normalize(text: str) -> str:
    """Lower-case, whitespace collapsed, one trailing period removed (the generic ``exact_match``'s normalization)."""
    text = " ".join(text.strip().lower().split())
    return text[:-1].rstrip() if text.endswith(".") else text


def exact_match(prediction: str, record: dict[str, Any], *, mode: str = "official") -> float:
    """1 if the normalized prediction equals a normalized answer (any of a list); the same in both modes."""
    check_mode(mode)
    pred = normalize(prediction)
    return float(any(pred == normalize(a) for a in answers(record)))


def option_accuracy(prediction: str, record: dict[str, Any], *, mode: str = "official") -> float:
    """1 if the letter read by ``options.option_letter`` is the answer letter; the same in both modes.

    Reads ``B``, ``B.``, ``(B)``, ``B)``, ``B. text`` and ``the answer is B``
    (any case); a lone ``I`` or ``a`` inside a sentence is no answer.
    """
    check_mode(mode)
    golds = [a.strip().upper().rstrip(".") for a in answers(record)]
    letter = option_letter(prediction)
    return float(letter is not None and letter in golds)


def substring_match(prediction: str, record: dict[str, Any], *, mode: str = "official") -> float:
    """1 if prediction and answer contain one another as whole words (case-folded); the same in both modes.

    The careful form of CoIN's ImageNet rule (see ``coin_imagenet`` for the
    script's own): an empty prediction is wrong, ``"cat"`` is not in ``"bobcat"``.
    """
    check_mode(mode)
    return float(any(contains_words(prediction, a) or contains_words(a, prediction) for a in answers(record)))


def token_f1(prediction: str, record: dict[str, Any], *, mode: str = "official") -> float:
    """The best over answers of the F1 of shared word tokens (SQuAD's token F1: lower-cased, punctuation
    dropped, split on whitespace, counted with multiplicity); the same in both modes.

    Partial credit for free-form answers (the synthetic scene captions, the base's general task).
    """
    check_mode(mode)

    def tokens(text: str) -> list[str]:
        return "".join(c if c.isalnum() or c.isspace() else " " for c in text.lower()).split()

    pred = tokens(prediction)
    best = 0.0
    for answer in answers(record):
        gold = tokens(answer)
        common = sum(min(pred.count(w), gold.count(w)) for w in set(gold))
        if common:
            p, r = common / len(pred), common / len(gold)
            best = max(best, 2 * p * r / (p + r))
        elif not pred and not gold:
            best = 1.0
    return best


def grounding_iou(prediction: str, record: dict[str, Any], *, mode: str = "official") -> float:
    """1 if the first ``[x1, y1, x2, y2]`` of the prediction overlaps the answer box with IoU > 0.5.

    Unparseable is wrong. Boxes are compared in the normalized coordinates
    both are written in; the same in both modes (CoIN's own parsing is
    ``coin_grounding``).
    """
    check_mode(mode)
    truth = parse_box(record.get("answer_bbox") or answers(record)[0])
    if truth is None:
        raise ValueError(f"test row {qid(record)}: no box in its answer")
    pred = parse_box(prediction)
    return float(pred is not None and iou(pred, truth) > 0.5)


# --------------------------------------------------------------------------- documents and charts


def docvqa_anls(prediction: str, record: dict[str, Any], *, mode: str = "official") -> float:
    """ANLS against the row's answers (DocVQA, InfographicVQA), with the 0.5 cut-off in both modes.

    Official: the DocVQA challenge script (``anls.anls_official``); quirk:
    the distance is divided by the raw strings' upper-cased lengths, so
    whitespace removed before the comparison still lengthens the
    denominator. Clean: the normalized strings' lengths, NFKC and case
    folding (``anls.anls_clean``).
    """
    check_mode(mode)
    gts = answers(record)
    return anls_official(prediction, gts) if mode == "official" else anls_clean(prediction, gts)


def chartqa_relaxed(prediction: str, record: dict[str, Any], *, mode: str = "official",
                    tolerance: float = DEFAULT_TOLERANCE) -> float:
    """Relaxed accuracy (ChartQA): numbers within ``tolerance`` relative error, other answers exact; best over answers.

    Official: pix2struct's ``relaxed_correctness`` (``relaxed.relaxed_official``);
    quirks: a gold 0 needs an identical string, ``"50%"`` is 0.5, ``"1,000"``
    is not a number. Clean: ``relaxed.relaxed_clean``.
    """
    check_mode(mode)
    correct = relaxed_official if mode == "official" else relaxed_clean
    return float(any(correct(prediction, a, tolerance) for a in answers(record)))


# --------------------------------------------------------------------------- registry

RULES: dict[str, Callable[..., float]] = {
    # generic (the synthetic benchmark's scorers)
    "exact_match": exact_match,
    "option_accuracy": option_accuracy,
    "substring_match": substring_match,
    "grounding_iou": grounding_iou,
    "token_f1": token_f1,
    "vqa_soft_accuracy": textvqa_soft_accuracy,
    "textvqa_soft_accuracy": textvqa_soft_accuracy,
    "anls": docvqa_anls,
    "relaxed_accuracy": chartqa_relaxed,
    # CoIN (zackschen/CoIN llava/eval/CoIN at 2412675)
    "coin_scienceqa": coin_scienceqa,
    "coin_textvqa": coin_textvqa,
    "coin_imagenet": coin_imagenet,
    "coin_gqa": coin_gqa,
    "coin_vizwiz": coin_vizwiz,
    "coin_grounding": coin_grounding,
    "coin_vqav2": coin_vqav2,
    "coin_ocrvqa": coin_ocrvqa,
    # MCITlib's and Prism's scripts where they differ from CoIN's
    "mcitlib_scienceqa": mcitlib_scienceqa,
    "mcitlib_grounding": mcitlib_grounding,
    "prism_scienceqa": prism_scienceqa,
    "prism_grounding": prism_grounding,
    # UCIT (MCITlib)
    "ucit_exact_match": ucit_exact_match,
    **UCIT_TASK_RULES,
    # MLLM-DCL (MCITlib)
    "mllm_dcl_rs": mllm_dcl_rs,
    "mllm_dcl_med": mllm_dcl_med,
    "mllm_dcl_ad": mllm_dcl_ad,
    "mllm_dcl_sci": mllm_dcl_sci,
    "mllm_dcl_fin": mllm_dcl_fin,
    # documents and charts (TriGap's DocVQA, InfographicVQA, ChartQA)
    "docvqa_anls": docvqa_anls,
    "infographicvqa_anls": docvqa_anls,
    "chartqa_relaxed": chartqa_relaxed,
}

CORPUS_RULES: dict[str, Callable[..., dict]] = {
    "caption_average": caption_average,
    "ucit_vizwiz_caption": caption_average,
    "ucit_flickr30k": caption_average,
}
"""Corpus-level scorers: ``fn(predictions, references, *, mode) -> dict`` (see ``captions``)."""


def get_rule(name: str) -> Callable[..., float]:
    """The per-sample rule registered under ``name``; a ValueError lists the registered names."""
    if name not in RULES:
        hint = " (a corpus-level scorer: use caption_average)" if name in CORPUS_RULES else ""
        raise ValueError(f"unknown scoring rule {name!r}{hint}; registered: {', '.join(sorted(RULES))}")
    return RULES[name]


__all__ = [
    "CORPUS_RULES",
    "MODES",
    "RULES",
    "anls",
    "caption_average",
    "chartqa_relaxed",
    "coin_gqa",
    "coin_grounding",
    "coin_imagenet",
    "coin_ocrvqa",
    "coin_scienceqa",
    "coin_textvqa",
    "coin_vizwiz",
    "coin_vqav2",
    "docvqa_anls",
    "exact_match",
    "get_rule",
    "grounding_iou",
    "infographicvqa_anls",
    "iou",
    "mcitlib_grounding",
    "mcitlib_scienceqa",
    "mllm_dcl_ad",
    "mllm_dcl_fin",
    "mllm_dcl_med",
    "mllm_dcl_rs",
    "mllm_dcl_sci",
    "normalize",
    "option_accuracy",
    "option_letter",
    "parse_box",
    "prism_grounding",
    "prism_scienceqa",
    "relaxed_accuracy",
    "substring_match",
    "textvqa_soft_accuracy",
    "token_f1",
    "ucit_arxivqa",
    "ucit_clevr_math",
    "ucit_exact_match",
    "ucit_iconqa",
    "ucit_imagenet_r",
    "vqa_soft_accuracy",
]

vqa_soft_accuracy = textvqa_soft_accuracy
infographicvqa_anls = anls = docvqa_anls
relaxed_accuracy = chartqa_relaxed
ucit_imagenet_r = ucit_arxivqa = ucit_iconqa = ucit_clevr_math = ucit_exact_match
