"""CoIN's per-task rules, with MCITlib's and Prism's variants of the same tasks.

The official modes reproduce the scripts in zackschen/CoIN
``llava/eval/CoIN/`` at commit 2412675 (the benchmark's own repository; every
``coin_*`` rule follows that revision, ``docs/scorers.md`` names the file per
rule and where the later ``ETrain/`` copies differ), Ghy0501/MCITlib
``llava/eval/CoIN/`` and Zhen-Hao-Xie/Prism ``backbone/shared/eval/``, one
prediction at a time. Things the scripts do at file level that a per-sample
rule cannot (CoIN's ImageNet script pairs predictions with test rows by
*position*, not ``question_id``; ScienceQA counts a missing prediction as
wrong) are the caller's business: score every test row once, in any order.
"""

from __future__ import annotations

from typing import Any

from mllm_cl.eval.boxes import (
    iou,
    iou_as_scripts,
    parse_answer_box_coin,
    parse_box_clean,
    parse_box_coin,
    parse_box_first_four,
    scale,
)
from mllm_cl.eval.common import (
    answers,
    check_mode,
    clean_text,
    contains_words,
    field,
    qid,
    says_unanswerable,
    single_answer,
)
from mllm_cl.eval.normalize import vqa_normalize
from mllm_cl.eval.options import (
    clean_option_letter,
    coin_option_letter,
    gold_letter,
    llava_option_letter,
    parse_options,
)

# --------------------------------------------------------------------------- ScienceQA


def _scienceqa_gold(record: dict[str, Any]) -> str:
    answer = field(record, "answer")
    letter = gold_letter(answer if isinstance(answer, (str, int)) else single_answer(record, "ScienceQA"))
    if letter is None:
        raise ValueError(f"test row {qid(record)}: ScienceQA's answer must be an option letter, got {answer!r}")
    return letter


def _scienceqa_clean(prediction: str, record: dict[str, Any]) -> float:
    options = parse_options(str(record.get("text", "")))
    return float(clean_option_letter(prediction, options or None) == _scienceqa_gold(record))


def coin_scienceqa(prediction: str, record: dict[str, Any], *, mode: str = "official") -> float:
    """ScienceQA option accuracy as CoIN scores it (``eval_science_qa.py``).

    Official quirks: the letter is the prediction itself if it is exactly
    ``A``-``E``, else its first character when followed by ``". "``, else the
    *first one-character word* of the text, upper-cased, so ``"I think B"``
    answers ``I``, ``"a triangle"`` answers ``A`` and ``"3"`` answers nothing
    valid; case-sensitive in the first two forms.

    Clean: ``options.clean_option_letter``, restricted to the options the
    prompt lists (``A. ...`` lines or ``(A) ...``), so a stray word is no
    answer and ``"(b)"``, ``"B)"`` or the option's text are read as meant.
    """
    check_mode(mode)
    if mode == "clean":
        return _scienceqa_clean(prediction, record)
    return float(coin_option_letter(prediction) == _scienceqa_gold(record))


def mcitlib_scienceqa(prediction: str, record: dict[str, Any], *, mode: str = "official") -> float:
    """ScienceQA option accuracy as MCITlib and Prism score it (LLaVA's ``eval_science_qa.py``).

    Official quirks: only three forms are read: exactly ``A``-``E``;
    ``A``-``E`` followed by ``". "``; or ``The answer is X`` followed by one
    more character, occurring exactly once. ``"B."``, ``"(B)"``, ``"b"``,
    ``"B) ..."``, and ``"The answer is B"`` at the very end are all wrong.

    Clean: as ``coin_scienceqa``'s clean mode.
    """
    check_mode(mode)
    if mode == "clean":
        return _scienceqa_clean(prediction, record)
    return float(llava_option_letter(prediction) == _scienceqa_gold(record))


prism_scienceqa = mcitlib_scienceqa

# --------------------------------------------------------------------------- TextVQA


def textvqa_soft_accuracy(prediction: str, record: dict[str, Any], *, mode: str = "official") -> float:
    """VQA soft accuracy against the human answers (TextVQA; CoIN ``eval_textvqa.py`` via ``m4c_evaluator.py``).

    An answer given by k of the humans scores the mean, over the leave-one-out
    subsets of the answers, of ``min(1, matches among the others / 3)``: with
    ten answers, 1 match -> 0.3, 2 -> 0.6, 3 -> 0.9, 4 or more -> 1 (this
    averaging is the standard metric, not a quirk). Prediction and answers
    go through ``normalize.vqa_normalize``.

    Official: the m4c answer processor, quirks included (number words only
    up to ten, hyphens kept or dropped depending on spacing elsewhere, at
    most 32 periods removed, see ``normalize``); exactly ten answers are
    required, as the evaluator asserts.

    Clean: ``clean_vqa_normalize``; any number of answers (one answer is an
    exact match after normalization).
    """
    check_mode(mode)
    gts = answers(record)
    if mode == "official" and len(gts) != 10:
        raise ValueError(f"test row {qid(record)}: TextVQA's evaluator needs the ten human answers, got {len(gts)} "
                         "(give 'answer' as the list of ten, or score it with mode='clean')")
    gts = [vqa_normalize(a, mode) for a in gts]
    pred = vqa_normalize(prediction, mode)
    if len(gts) == 1:
        return float(pred == gts[0])
    if pred not in gts:
        return 0.0
    k = gts.count(pred)
    # Summed in answer order, as the evaluator does, so the float result is the same to the last bit:
    # leaving out a matching answer leaves k - 1 matches, leaving out another leaves k.
    total = 0.0
    for gt in gts:
        total += min(1.0, (k - 1 if gt == pred else k) / 3)
    return total / len(gts)


coin_textvqa = textvqa_soft_accuracy

# --------------------------------------------------------------------------- ImageNet, GQA, VizWiz, VQAv2, OCR-VQA


def coin_imagenet(prediction: str, record: dict[str, Any], *, mode: str = "official") -> float:
    """Class-name substring match (CoIN ``eval_ImagetNet.py``; MCITlib ``eval_imagenet.py``).

    Official quirks: correct if the label is a substring of the prediction or
    the prediction of the label, case-sensitively and without normalization;
    so an empty prediction is always correct, ``"Cat"`` is wrong for ``"cat"``
    and ``"cat"`` is right for ``"bobcat"``. (The script also pairs
    predictions with labels by line position rather than ``question_id``.)

    Clean: case-folded, whole-word containment either way (``"cat"`` is not in
    ``"bobcat"``), and an empty prediction is wrong.
    """
    check_mode(mode)
    if mode == "clean":
        return float(any(contains_words(prediction, a) or contains_words(a, prediction) for a in answers(record)))
    return float(any(a in prediction or prediction in a for a in answers(record)))


def coin_gqa(prediction: str, record: dict[str, Any], *, mode: str = "official") -> float:
    """GQA exact match (CoIN's GQA conversion step, then ``eval_gqa.py``'s accuracy).

    Official quirks: the prediction loses all trailing periods and is
    lower-cased, nothing else, then must equal the answer string exactly:
    any leading or trailing space makes it wrong (``" yes"`` scores 0 against
    ``"yes"``), and the answer itself is not lower-cased. (CoIN's later
    ``ETrain`` copy of the converter also drops one leading space; see
    ``docs/scorers.md``, "Which revision".)

    Clean: ``clean_text`` on both sides.
    """
    check_mode(mode)
    gold = single_answer(record, "GQA")
    if mode == "clean":
        return float(clean_text(prediction) == clean_text(gold))
    return float(prediction.rstrip(".").lower() == gold)


def _upper_match(prediction: str, record: dict[str, Any], mode: str, benchmark: str) -> float:
    check_mode(mode)
    gold = single_answer(record, benchmark)
    if mode == "clean":
        return float(clean_text(prediction) == clean_text(gold))
    return float(prediction.upper() == gold.upper())


def coin_vizwiz(prediction: str, record: dict[str, Any], *, mode: str = "official") -> float:
    """VizWiz exact match against CoIN's single answer (``eval_vizwiz.py``).

    Official quirks: ``prediction.upper() == answer.upper()`` with no
    stripping, so ``"yes."`` or ``" yes"`` are wrong, and Unicode
    upper-casing equates ``"ß"`` with ``"SS"``.

    Clean: ``clean_text`` on both sides (case folding, whitespace, trailing
    periods).
    """
    return _upper_match(prediction, record, mode, "VizWiz")


def coin_vqav2(prediction: str, record: dict[str, Any], *, mode: str = "official") -> float:
    """VQAv2 exact match against CoIN's own single-answer test file (``eval_vqav2.py``).

    Official quirks: as ``coin_vizwiz`` (``upper()`` equality, nothing
    stripped). Clean: ``clean_text`` on both sides, as ``coin_vizwiz``.
    """
    return _upper_match(prediction, record, mode, "VQAv2")


def coin_ocrvqa(prediction: str, record: dict[str, Any], *, mode: str = "official") -> float:
    """OCR-VQA exact match (CoIN ``eval_ocrvqa.py``).

    Official quirks: a prediction containing ``"Unanswerable"`` (that exact
    case) is wrong whatever the answer; otherwise ``prediction.lower() ==
    answer.lower()`` with no stripping (``lower`` and ``upper`` disagree on
    some Unicode: ``"STRASSE"`` does not match ``"straße"`` here but does in
    ``coin_vizwiz``).

    Clean: a prediction saying "unanswerable" in any case is wrong unless the
    answer is "unanswerable"; otherwise ``clean_text`` on both sides.
    """
    check_mode(mode)
    gold = single_answer(record, "OCR-VQA")
    if mode == "clean":
        if says_unanswerable(prediction) and clean_text(gold) != "unanswerable":
            return 0.0
        return float(clean_text(prediction) == clean_text(gold))
    if "Unanswerable" in prediction:
        return 0.0
    return float(prediction.lower() == gold.lower())


# --------------------------------------------------------------------------- Grounding


def _size_factor(record: dict[str, Any]) -> float:
    size = field(record, "size", "[w, h] of the image, to scale the normalized boxes")
    try:
        return max(size)
    except (TypeError, ValueError):
        raise ValueError(f"test row {qid(record)}: 'size' must be [w, h], got {size!r}") from None


def _answer_box_text(record: dict[str, Any]) -> str:
    box = record.get("answer_bbox")
    return box if isinstance(box, str) else single_answer(record, "grounding")


def _grounding_clean(prediction: str, record: dict[str, Any]) -> float:
    truth = parse_box_clean(_answer_box_text(record))
    if truth is None:
        raise ValueError(f"test row {qid(record)}: no [x1, y1, x2, y2] box in its answer_bbox")
    pred = parse_box_clean(prediction)
    return float(pred is not None and iou(pred, truth) > 0.5)


def _grounding_coin(prediction: str, record: dict[str, Any], mode: str) -> float:
    check_mode(mode)
    if mode == "clean":
        return _grounding_clean(prediction, record)
    truth = parse_answer_box_coin(_answer_box_text(record))
    if truth is None:
        raise ValueError(f"test row {qid(record)}: answer_bbox {_answer_box_text(record)!r} is not four numbers")
    factor = _size_factor(record)
    pred = parse_box_coin(prediction)
    if pred is None:
        return 0.0
    return float(iou_as_scripts(scale(pred, factor), scale(truth, factor)) > 0.5)


def coin_grounding(prediction: str, record: dict[str, Any], *, mode: str = "official") -> float:
    """RefCOCO/+/g grounding, IoU > 0.5 (CoIN ``eval_grounding.py``).

    Boxes are ``[x1, y1, x2, y2]`` normalized to the square-padded image; both
    are scaled by ``max(size)`` before the IoU, as the script does.

    Official quirks (``boxes.parse_box_coin``): all brackets deleted, then the
    first and last remaining characters trimmed, so the last coordinate loses
    its last digit (``0.78`` -> ``0.7``), a leading space is what the trim
    eats (``" [.3, ...]"`` reads ``.3``) and ``"[0, 0, 1, 1]"`` or any text
    around the box is unparseable (wrong); inverted boxes go into the IoU
    formula unchecked. (CoIN's later ``ETrain`` copy first drops one leading
    space; see ``docs/scorers.md``, "Which revision".)

    Clean: ``boxes.parse_box_clean`` (the first real box in the text, brackets
    optional, no trimming; an inverted or empty box is wrong) and a standard
    IoU.
    """
    return _grounding_coin(prediction, record, mode)


def mcitlib_grounding(prediction: str, record: dict[str, Any], *, mode: str = "official") -> float:
    """Grounding as MCITlib's copy of CoIN's script scores it (``llava/eval/CoIN/eval_grounding.py``).

    The copy is CoIN's script of the revision ``coin_grounding`` follows, so
    the two rules agree on every input, in both modes; the name stays for
    benchmark definitions that say whose script they mean.
    """
    return _grounding_coin(prediction, record, mode)


def prism_grounding(prediction: str, record: dict[str, Any], *, mode: str = "official") -> float:
    """Grounding as Prism scores it (``backbone/shared/eval/eval_unified.py``, default parse).

    Official quirks: both boxes are the *first four numbers anywhere* in the
    text (``boxes.parse_box_first_four``), so ``"object 2 at [0.1, 0.2, 0.3,
    0.4]"`` reads as ``[2, 0.1, 0.2, 0.3]``; a missing ``size`` counts as
    ``[1, 1]``; a ground truth it cannot read scores 0 rather than failing
    (a row with no ``answer_bbox`` at all is refused here as a broken test
    file, where the script would score it 0).

    Clean: as ``coin_grounding``'s clean mode.
    """
    check_mode(mode)
    if mode == "clean":
        return _grounding_clean(prediction, record)
    truth = parse_box_first_four(str(field(record, "answer_bbox", "the ground-truth box")))
    pred = parse_box_first_four(prediction)
    if truth is None or pred is None:
        return 0.0
    size = record.get("size") or [1, 1]
    factor = float(max(size))
    return float(iou_as_scripts(scale(pred, factor), scale(truth, factor)) > 0.5)
