"""CoIN's rules (and MCITlib's / Prism's variants of CoIN tasks), both modes, on hand-computed cases."""

import pytest

from mllm_cl.eval.rules import (
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


def row(answer, **extra):
    return {"question_id": "q7", "text": "prompt", "answer": answer, **extra}


SQA_PROMPT = "Which shape has four equal sides?\nA. circle\nB. square\nC. triangle\nAnswer with the option's letter."


# ----------------------------------------------------------------- ScienceQA

@pytest.mark.parametrize("pred,gold,official,clean", [
    ("B", "B", 1, 1),
    ("B. square", "B", 1, 1),
    ("b", "B", 1, 1),                      # first one-character word, upper-cased
    ("(B)", "B", 1, 1),
    ("The answer is B.", "B", 1, 1),
    ("I think it is B", "B", 0, 0),        # official reads "I"; clean finds no stated letter
    ("a circle", "A", 1, 0),               # official reads the article "a" as option A
    ("square", "B", 0, 1),                 # clean maps the option's text to its letter
    ("D", "D", 1, 0),                      # clean: D is not among the prompt's options
    ("3", "B", 0, 0),
    ("", "B", 0, 0),
])
def test_coin_scienceqa(pred, gold, official, clean):
    r = {**row(gold), "text": SQA_PROMPT}
    assert coin_scienceqa(pred, r) == official
    assert coin_scienceqa(pred, r, mode="clean") == clean


@pytest.mark.parametrize("pred,official", [
    ("B", 1), ("B. square", 1), ("The answer is B.", 1),
    ("b", 0), ("(B)", 0), ("B.", 0), ("B) square", 0),
    ("The answer is B", 0),                            # the pattern wants one more character after the letter
    ("The answer is B. The answer is B.", 0),          # found twice: no answer
    ("the answer is B.", 0),                           # case-sensitive phrase
])
def test_mcitlib_and_prism_scienceqa(pred, official):
    r = {**row("B"), "text": SQA_PROMPT}
    assert mcitlib_scienceqa(pred, r) == official
    assert prism_scienceqa(pred, r) == official
    assert mcitlib_scienceqa(pred, r, mode="clean") == 1.0


def test_scienceqa_gold_forms_and_errors():
    assert coin_scienceqa("C", row("(C)")) == 1.0 and coin_scienceqa("C", row(2)) == 1.0
    with pytest.raises(ValueError, match="'q7'.*option letter"):
        coin_scienceqa("B", row("square"))


# ----------------------------------------------------------------- TextVQA soft accuracy

TEN = ["2", "2", "two", "3", "3", "3", "3", "4", "5", "6"]


@pytest.mark.parametrize("pred,expected", [
    ("Two", 0.9),      # "two" -> "2": three humans -> (3 * 2/3 + 7 * 1) / 10
    ("3", 1.0),        # four humans
    ("the 4.", 0.3),   # one human: (1 * 0 + 9 * 1/3) / 10; article and period removed
    ("7", 0.0),
])
def test_textvqa_soft_accuracy(pred, expected):
    assert textvqa_soft_accuracy(pred, row(TEN)) == pytest.approx(expected)
    assert coin_textvqa(pred, row(TEN), mode="clean") == pytest.approx(expected)


def test_textvqa_two_humans_and_number_words_above_ten():
    two = ["red"] * 2 + ["blue"] * 8
    assert textvqa_soft_accuracy("red", row(two)) == pytest.approx(0.6)  # (2 * 1/3 + 8 * 2/3) / 10
    eleven = ["11"] * 10
    assert textvqa_soft_accuracy("eleven", row(eleven)) == 0.0            # official: number words stop at ten
    assert textvqa_soft_accuracy("eleven", row(eleven), mode="clean") == 1.0


def test_textvqa_answer_count():
    with pytest.raises(ValueError, match="'q7'.*ten human answers, got 1"):
        textvqa_soft_accuracy("red", row("red"))
    assert textvqa_soft_accuracy("Red.", row("red"), mode="clean") == 1.0  # clean: one answer is an exact match
    # three answers, two "red": leaving out a "red" leaves 1 match (1/3), leaving out "blue" leaves 2 (2/3)
    assert textvqa_soft_accuracy("red", row(["red", "red", "blue"]), mode="clean") == pytest.approx(4 / 9)


# ----------------------------------------------------------------- ImageNet, GQA, VizWiz, VQAv2, OCR-VQA

@pytest.mark.parametrize("pred,gold,official,clean", [
    ("golden retriever", "golden retriever", 1, 1),
    ("a golden retriever dog", "golden retriever", 1, 1),
    ("retriever", "golden retriever", 1, 1),
    ("Golden Retriever.", "golden retriever", 0, 1),   # official is case-sensitive
    ("", "golden retriever", 1, 0),                    # official: "" is a substring of everything
    ("bobcat", "cat", 1, 0),                           # clean: whole words only
])
def test_coin_imagenet(pred, gold, official, clean):
    assert coin_imagenet(pred, row(gold)) == official
    assert coin_imagenet(pred, row(gold), mode="clean") == clean


@pytest.mark.parametrize("pred,gold,official,clean", [
    ("Yes.", "yes", 1, 1), ("yes...", "yes", 1, 1),
    (" yes", "yes", 0, 1),     # only periods are stripped, and only at the end: a leading space stays
    ("  yes", "yes", 0, 1),
    (" Yes.", "yes", 0, 1),
    ("yes ", "yes", 0, 1),     # trailing space kept
    ("yes. ", "yes", 0, 1),    # the space hides the period from rstrip('.')
    ("yes", "Yes", 0, 1),      # the answer is not lower-cased
    ("no", "yes", 0, 0),
])
def test_coin_gqa(pred, gold, official, clean):
    assert coin_gqa(pred, row(gold)) == official
    assert coin_gqa(pred, row(gold), mode="clean") == clean


@pytest.mark.parametrize("rule", [coin_vizwiz, coin_vqav2])
@pytest.mark.parametrize("pred,gold,official,clean", [
    ("Unanswerable", "unanswerable", 1, 1),
    ("yes.", "yes", 0, 1), (" 2", "2", 0, 1), ("Two", "two", 1, 1),
    ("straße", "STRASSE", 1, 1),   # upper("ß") is "SS"; clean folds case the same way
    ("", "yes", 0, 0),
])
def test_coin_vizwiz_vqav2(rule, pred, gold, official, clean):
    assert rule(pred, row(gold)) == official
    assert rule(pred, row(gold), mode="clean") == clean


@pytest.mark.parametrize("pred,gold,official,clean", [
    ("Harry Potter", "harry potter", 1, 1),
    ("Unanswerable", "unanswerable", 0, 1),      # official: "Unanswerable" in the prediction is always wrong
    ("unanswerable", "unanswerable", 1, 1),      # ... but only in that case
    ("unanswerable", "harry potter", 0, 0),
    ("UNANSWERABLE", "harry potter", 0, 0),
    ("STRASSE", "straße", 0, 1),                 # lower("STRASSE") != "straße"; casefold agrees
    ("harry potter.", "harry potter", 0, 1),
])
def test_coin_ocrvqa(pred, gold, official, clean):
    assert coin_ocrvqa(pred, row(gold)) == official
    assert coin_ocrvqa(pred, row(gold), mode="clean") == clean


def test_single_answer_rules_refuse_lists():
    with pytest.raises(ValueError, match="'q7'.*GQA scores against one answer"):
        coin_gqa("yes", row(["yes", "no"]))
    assert coin_vizwiz("yes", row(["yes"])) == 1.0


# ----------------------------------------------------------------- Grounding

GT = "[0.10, 0.20, 0.50, 0.60]"


def box_row(gt=GT, size=(640, 480)):
    return {"question_id": "g1", "text": "where is the dog", "answer": gt, "answer_bbox": gt, "size": list(size)}


@pytest.mark.parametrize("pred,official,clean", [
    ("[0.10, 0.20, 0.50, 0.60]", 1, 1),   # reads [0.1, 0.2, 0.5, 0.6]: the trim eats a trailing zero
    (" [0.10, 0.20, 0.50, 0.60]", 1, 1),
    ("[0.1, 0.2, 0.5, 0.6]", 0, 1),       # reads y2 = 0. -> empty box, IoU 0
    ("[0.10, 0.20, 0.50, 0.64]", 1, 1),   # reads y2 = 0.6
    ("The dog is at [0.10, 0.20, 0.50, 0.60].", 0, 1),  # words around the box: unparseable
    ("[0.10 0.20 0.50 0.60]", 0, 0),      # no commas
    ("[0.50, 0.60, 0.10, 0.20]", 0, 0),   # inverted
    ("[0.10, 0.20, 0.50]", 0, 0),
    ("", 0, 0),
    ("[0.12, 0.22, 0.52, 0.62]", 1, 1),   # IoU 0.38 * 0.38 / (0.16 + 0.16 - 0.1444) = 0.823
    ("[0.30, 0.20, 0.70, 0.60]", 0, 0),   # IoU 0.2 * 0.4 / (0.16 + 0.16 - 0.08) = 0.333
])
def test_coin_grounding(pred, official, clean):
    assert coin_grounding(pred, box_row()) == official
    assert coin_grounding(pred, box_row(), mode="clean") == clean


def test_grounding_whole_image_box_and_non_square_images():
    whole = "[0, 0, 1, 1]"
    # "0, 0, 1, 1" trimmed to ", 0, 1, " does not parse: a correct whole-image box scores 0 officially
    assert coin_grounding(whole, box_row(whole)) == 0.0
    assert coin_grounding(whole, box_row(whole), mode="clean") == 1.0
    # both boxes are scaled by max(w, h); the verdict is the same for landscape, portrait and square images
    for size in [(640, 480), (480, 640), (500, 500)]:
        assert coin_grounding("[0.12, 0.22, 0.52, 0.62]", box_row(size=size)) == 1.0


@pytest.mark.parametrize("rule", [coin_grounding, mcitlib_grounding])
@pytest.mark.parametrize("pred,official", [
    (" [.30, .20, .50, .60]", 1),   # the trim eats the leading space, the box survives whole
    ("[.30, .20, .50, .60]", 0),    # without the space the trim eats the "." of x1: it reads 30
    (" [0.30, 0.20, 0.50, 0.60]", 1),
    (" [0.3, 0.2, 0.5, 0.6]", 0),   # the trim takes the space and the last digit: y2 reads "0." = 0
    ("  [0.30, 0.20, 0.50, 0.60]", 1),  # float() accepts the space the trim leaves
])
def test_grounding_leading_space(rule, pred, official):
    # CoIN's revision and MCITlib's copy read the space the same way: no leading space is dropped first
    # (CoIN's later ETrain copy drops one, which turns the first case into 0: x1 reads 30).
    gt = "[0.30, 0.20, 0.50, 0.60]"
    assert rule(pred, box_row(gt)) == official
    assert rule(pred, box_row(gt), mode="clean") == 1.0


@pytest.mark.parametrize("pred,official,clean", [
    ("The dog is at [0.10, 0.20, 0.50, 0.60].", 1, 1),
    ("[0.10 0.20 0.50 0.60]", 1, 0),            # any separator will do for Prism
    ("dog 2 at [0.10, 0.20, 0.50, 0.60]", 0, 1),  # first four numbers: [2, 0.1, 0.2, 0.5]
    ("[0.1, 0.2, 0.5, 0.6]", 1, 1),
    ("0.1 0.2", 0, 0),
])
def test_prism_grounding(pred, official, clean):
    assert prism_grounding(pred, box_row()) == official
    assert prism_grounding(pred, box_row(), mode="clean") == clean


def test_grounding_row_errors():
    no_size = {k: v for k, v in box_row().items() if k != "size"}
    with pytest.raises(ValueError, match="'g1' has no 'size'"):
        coin_grounding("[0.10, 0.20, 0.50, 0.60]", no_size)
    assert prism_grounding("[0.10, 0.20, 0.50, 0.60]", no_size) == 1.0   # Prism assumes [1, 1]
    bad = box_row("left side")
    with pytest.raises(ValueError, match="'g1'.*not four numbers"):
        coin_grounding("[0.10, 0.20, 0.50, 0.60]", bad)
    with pytest.raises(ValueError, match="'g1'.*no \\[x1, y1, x2, y2\\] box"):
        coin_grounding("[0.10, 0.20, 0.50, 0.60]", bad, mode="clean")
    assert prism_grounding("[0.10, 0.20, 0.50, 0.60]", bad) == 0.0      # Prism silently scores it 0
