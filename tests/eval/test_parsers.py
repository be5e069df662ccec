"""The building blocks: VQA answer normalization, box parsers, option-letter extractors."""

import pytest

from mllm_cl.eval.boxes import (
    iou,
    iou_as_scripts,
    parse_answer_box_coin,
    parse_box_clean,
    parse_box_coin,
    parse_box_first_four,
)
from mllm_cl.eval.common import clean_text, contains_words
from mllm_cl.eval.normalize import clean_vqa_normalize, official_vqa_normalize
from mllm_cl.eval.options import (
    clean_option_letter,
    coin_option_letter,
    gold_letter,
    llava_option_letter,
    parse_options,
)


@pytest.mark.parametrize("text,official,clean", [
    ("Two Dogs", "2 dogs", "2 dogs"),
    ("the cat", "cat", "cat"),
    ("ten", "10", "10"),
    ("eleven", "eleven", "11"),
    ("twenty-one", "twenty 1", "21"),
    ("t-shirt", "t shirt", "t shirt"),
    ("t-shirt - red", "tshirt red", "t shirt red"),   # official: a spaced "-" anywhere deletes every "-"
    ("black/white", "black white", "black white"),
    ("black/white / grey", "blackwhite grey", "black white grey"),
    ("dont", "don't", "don't"),
    ("Im", "im", "i'm"),                               # official's key is "Im", never matched after lower-casing
    ("somebody'd", "somebodyd", "somebody'd"),         # official's table maps it backwards
    ("The man's hat.", "man 's hat", "man's hat"),
    ("1,000", "1000", "1000"),
    ("3.14", "3.14", "3.14"),
    ("5.", "5", "5"),
    ("a.m.", "am", "am"),
    ("yes!", "yes", "yes"),
    ("50%", "50%", "50"),
    ("red: blue", "red: blue", "red blue"),            # ":" is not in the official punctuation list
    ("ÉCOLE", "école", "école"),
    ("line\nbreak", "line break", "line break"),
    ("", "", ""),
])
def test_vqa_normalize(text, official, clean):
    assert official_vqa_normalize(text) == official
    assert clean_vqa_normalize(text) == clean


def test_official_removes_at_most_32_periods():
    text = "x." * 40
    assert official_vqa_normalize(text).count(".") == 8
    assert clean_vqa_normalize(text) == "x" * 40


def test_clean_text_and_word_containment():
    assert clean_text("  The  Straße.. ") == "the strasse"
    assert contains_words("A black cat.", "cat") and not contains_words("catamaran", "cat")
    assert contains_words("golden retriever", "Golden Retriever") and not contains_words("x", "")


@pytest.mark.parametrize("text,expected", [
    ("[0.10, 0.20, 0.50, 0.60]", (0.1, 0.2, 0.5, 0.6)),
    ("[0.12, 0.34, 0.56, 0.78]", (0.12, 0.34, 0.56, 0.7)),
    (" [.30, .20, .50, .60]", (0.3, 0.2, 0.5, 0.6)),     # the trim eats the leading space
    ("[.30, .20, .50, .60]", (30.0, 0.2, 0.5, 0.6)),     # ... or, without one, the "." of x1
    ("  [0.1, 0.2, 0.5, 0.6]", (0.1, 0.2, 0.5, 0.0)),    # one space trimmed, float(" 0.1") allows the other
    ("[0, 0, 1, 1]", None),
    ("box [0.1, 0.2, 0.5, 0.6]", None),
    ("[[0.10, 0.20, 0.50, 0.60]]", (0.1, 0.2, 0.5, 0.6)),
    ("", None),
])
def test_parse_box_coin(text, expected):
    assert parse_box_coin(text) == expected


def test_other_box_parsers():
    assert parse_answer_box_coin("[0.1, 0.2, 0.5, 0.6]") == (0.1, 0.2, 0.5, 0.6)
    assert parse_answer_box_coin("[0.1, 0.2]") is None
    assert parse_box_first_four("x=0.1 y=.2 w=-3 h=1e-1 more 9") == (0.1, 0.2, -3.0, 0.1)
    assert parse_box_first_four("1 2 3") is None
    assert parse_box_clean("It is at (0.1, 0.2, 0.5, 0.6).") == (0.1, 0.2, 0.5, 0.6)
    assert parse_box_clean("0.1, 0.2, 0.5, 0.6") == (0.1, 0.2, 0.5, 0.6)
    assert parse_box_clean("[0.5, 0.2, 0.1, 0.6]") is None          # x2 < x1
    assert parse_box_clean("[0.1, 0.2, 0.5, 0.6, 0.7]") is None
    assert parse_box_clean("see [1, 2] then [0, 0, 1, 1]") == (0.0, 0.0, 1.0, 1.0)


def test_iou():
    assert iou((0.1, 0.1, 0.5, 0.4), (0.1, 0.1, 0.5, 0.5)) == pytest.approx(0.75)
    assert iou((0.5, 0.5, 0.1, 0.1), (0.1, 0.1, 0.5, 0.5)) == 0.0
    # the scripts' formula on a doubly inverted box: the "areas" are positive, the overlap is clipped to 0
    assert iou_as_scripts((0.5, 0.5, 0.1, 0.1), (0.1, 0.1, 0.5, 0.5)) == 0.0
    assert iou_as_scripts((0, 0, 2, 2), (1, 1, 3, 3)) == pytest.approx(1 / 7)


@pytest.mark.parametrize("text,coin,llava,clean", [
    ("B", "B", "B", "B"),
    ("B. square", "B", "B", "B"),
    ("B.", "B", None, "B"),
    ("(B)", "B", None, "B"),
    ("b", "B", None, "B"),
    ("B) square", "B", None, "B"),
    ("The answer is B.", "B", "B", "B"),
    ("The answer is B", "B", None, "B"),
    ("Answer: (c)", "C", None, "C"),
    ("I think it is B", "I", None, None),
    ("a square", "A", None, None),
    ("F", "F", None, "F"),
    ("", None, None, None),
    ("no letter here", None, None, None),
    ("The answer is a cat", "A", None, None),          # a small "a" followed by a word is the article
    ("the answer is b.", "B", None, "B"),
    ("Options: A, B", "A", None, None),
])
def test_option_extractors(text, coin, llava, clean):
    assert coin_option_letter(text) == coin
    assert llava_option_letter(text) == llava
    assert clean_option_letter(text) == clean


def test_options_from_the_prompt():
    lines = "Question?\nA. circle\nB. square\nC. triangle\nAnswer with the letter."
    assert parse_options(lines) == {"A": "circle", "B": "square", "C": "triangle"}
    inline = "Which one? Options: (A) red cube (B) blue ball"
    assert parse_options(inline) == {"A": "red cube", "B": "blue ball"}
    assert parse_options("A. only one") == {} and parse_options("A. x\nC. y") == {}
    options = parse_options(lines)
    assert clean_option_letter("Square.", options) == "B"
    assert clean_option_letter("F", options) is None
    assert gold_letter(" (b). ") == "B" and gold_letter(3) == "D" and gold_letter("square") is None
