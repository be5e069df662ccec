"""Caption scoring: pycocoevalcap's scorers on hand-derived and recorded cases, the average in both modes, the
Java backend and its errors."""

import importlib.util
import math
import random
import sys
import tempfile
from pathlib import Path

import pytest

from mllm_cl.eval import captions
from mllm_cl.eval.captions import CaptionBackendError, backend_missing, caption_average, caption_scores
from mllm_cl.eval.rules import CORPUS_RULES, get_rule

needs_package = pytest.mark.skipif(importlib.util.find_spec("pycocoevalcap") is None,
                                   reason="pycocoevalcap (the optional 'captions' extra) is not installed")


def _java_or_skip():
    missing = backend_missing()
    if missing:
        pytest.skip("caption scoring's Java backend is missing: " + "; ".join(missing))


def _scores(predictions, references):
    """BLEU-1..4, ROUGE-L (0-1) and CIDEr (0-10) of tokenized captions."""
    out = caption_scores(predictions, references, meteor_score=0.0)
    return [out[k] / 100 for k in ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr")]


@needs_package
def test_bleu_brevity_penalty_and_smoothing():
    # "a b" against "a b c d": p1 = p2 = 1, p3 = p4 = 1e-15 / 1e-9 (no 3- or 4-grams), BP = exp(1 - 4/2)
    bp = math.exp(-1)
    assert _scores(["a b"], [["a b c d"]])[:4] == pytest.approx(
        [bp, bp, 1e-6 ** (1 / 3) * bp, 1e-6 ** (2 / 4) * bp], rel=1e-6)
    assert _scores(["a b c d"], [["a b c d"]])[:4] == pytest.approx([1, 1, 1, 1], abs=1e-8)


@needs_package
def test_bleu_closest_reference_length():
    # references of 2 and 6 words for a 3-word candidate: the closest (2) is the length, so no brevity penalty;
    # unigram matches are clipped by the largest count in any one reference
    assert _scores(["a b c"], [["a b", "a b c d e f"]])[0] == pytest.approx(1.0, abs=1e-8)
    # a tie (2 and 4 words around 3) takes the shorter reference
    assert _scores(["a b x"], [["a b", "a b y z"]])[0] == pytest.approx(2 / 3, abs=1e-8)


@needs_package
def test_rouge_l_takes_best_precision_and_best_recall_separately():
    # ref 1 "a c e": LCS 2 -> P 2/4, R 2/3; ref 2 "b c d x y z": LCS 3 -> P 3/4, R 3/6
    # the reference implementation pairs the best P (3/4) with the best R (2/3)
    p, r = 3 / 4, 2 / 3
    expected = (1 + 1.2 ** 2) * p * r / (r + 1.2 ** 2 * p)
    assert _scores(["a b c d"], [["a c e", "b c d x y z"]])[4] == pytest.approx(expected)
    assert _scores(["x"], [["a b"]])[4] == 0.0


@needs_package
def test_cider_d_on_a_two_image_corpus():
    # every n-gram occurs in one image's references: idf = log(2) for all, so each present n is a perfect cosine
    # "a b": unigrams and the bigram match (1, 1), no 3- or 4-grams (0, 0): mean 0.5, x10 -> 5
    assert _scores(["a b", "c d"], [["a b"], ["c d"]])[5] == pytest.approx(5.0)
    assert _scores(["a b c d", "e f g h"], [["a b c d"], ["e f g h"]])[5] == pytest.approx(10.0)
    # an n-gram found in every image's references has idf 0 and contributes nothing
    assert _scores(["a", "a"], [["a"], ["a"]])[5] == 0.0


@needs_package
def test_cider_d_length_penalty():
    # a 1-word candidate against a 3-word reference: the Gaussian penalty exp(-delta^2 / (2 * 6^2)) with delta = -2
    # (pycocoevalcap counts the length in bigrams, 0 vs 2: the same as in words for non-empty captions)
    refs = [["a b c"], ["d e f"]]
    unigram_cos = 1 / math.sqrt(3)  # idf log(2) everywhere: (a) . (a, b, c) / (|a| |a, b, c|)
    expected_first = unigram_cos * math.exp(-4 / 72) / 4 * 10
    expected_second = 10.0 * 3 / 4  # "d e f" identical: n = 1..3 perfect, no 4-grams
    assert _scores(["a", "d e f"], refs)[5] == pytest.approx((expected_first + expected_second) / 2)


# BLEU-1..4, ROUGE-L (0-1) and CIDEr (0-10) of the random corpora drawn in test_scores_of_random_corpora, as
# pycocoevalcap 1.2 computes them.
RECORDED = [
    (0.49123845165, 1.15786013439e-08, 4.78796648624e-11, 5.47518253188e-10, 0.220601220621, 0),
    (0.0944378013873, 2.43837354663e-09, 1.03942249874e-11, 1.20680763928e-10, 0.223428191005, 0.355772218025),
    (0.347993067611, 4.55629878183e-09, 1.15681186431e-11, 6.26358084931e-13, 0.325431781023, 0.266555645124),
    (0.583333333285, 0.360041149877, 2.78516551909e-06, 9.21208515159e-09, 0.546236759544, 0.98978948825),
    (0.624999999974, 0.249999999989, 1.57490131229e-06, 4.24761061187e-09, 0.427015403324, 0.377344453326),
    (0.687499999957, 7.56912588469e-09, 1.85331674198e-11, 9.76534804941e-13, 0.400657246423, 0.767357386122),
    (0.398351734911, 0.136633517852, 1.04589788674e-06, 3.08987664171e-09, 0.267789599265, 0.347279841359),
    (0.249999999938, 9.12870928909e-09, 3.4668063705e-11, 2.54066373945e-12, 0.448529411765, 0),
    (0.749999999813, 1.93649167238e-08, 7.21124784733e-11, 7.82542289694e-10, 0.279816513761, 0.244677042675),
    (0.406643460729, 0.237159282386, 1.33932414984e-06, 3.40357149857e-09, 0.396942846895, 0.445438982045),
    (0.303265329781, 6.78121892566e-09, 3.03265329781e-08, 6.41328089835e-08, 0.294510883257, 0.293934650425),
    (0.518861408715, 6.82138997838e-09, 1.84293690945e-11, 1.06011279755e-12, 0.15706401766, 0.389150943222),
    (0.285714285694, 0.15430334995, 1.33531451494e-06, 4.15350923681e-09, 0.171830985915, 0.467111359558),
    (0.0532932486755, 2.06403864551e-09, 8.79852149869e-09, 1.81658463741e-08, 0.21227064647, 0.123917533599),
    (0.526315789446, 5.92348877724e-09, 1.47204409088e-11, 8.2161073242e-13, 0.338654275709, 0.324985713448),
    (0.499999999958, 7.07106781122e-09, 1.84201574913e-11, 1.01025775222e-12, 0.312281333608, 0.490528629882),
    (0.256708559431, 5.74017789269e-09, 1.77991773889e-11, 1.09688231859e-12, 0.348780487805, 0.43287841333),
    (0.0790494183819, 0.0645435798251, 7.60059931042e-07, 4.6381547261e-07, 0.252066115702, 0.781920366474),
    (0.399999999973, 5.77350269146e-09, 1.49380158206e-11, 8.03428418869e-13, 0.215314687051, 0.508644368521),
    (0.523809523785, 5.55088505796e-09, 1.33329742048e-11, 6.97742664161e-13, 0.434750080781, 0.392918055873),
]


@needs_package
def test_scores_of_random_corpora():
    rng = random.Random(3)
    vocab = "a man dog on the grass runs red ball two play with".split()
    for expected in RECORDED:
        n = rng.randint(1, 5)
        preds = [" ".join(rng.choice(vocab) for _ in range(rng.randint(1, 8))) for _ in range(n)]
        refs = [[" ".join(rng.choice(vocab) for _ in range(rng.randint(1, 9))) for _ in range(rng.randint(1, 4))]
                for _ in range(n)]
        assert _scores(preds, refs) == pytest.approx(expected, abs=1e-9)


@needs_package
def test_average_exceeds_100_officially_and_not_in_clean_mode():
    preds, refs = ["a b c d", "e f g h"], [["a b c d"], ["e f g h"]]
    official = caption_scores(preds, refs, mode="official", meteor_score=1.0)
    assert official["CIDEr"] == pytest.approx(1000.0)
    assert official["Bleu_4"] == pytest.approx(100.0, abs=1e-5) and official["ROUGE_L"] == pytest.approx(100.0)
    assert official["Average"] == pytest.approx(1600 / 7)   # (6 x 100 + 1000) / 7
    assert official["mode"] == "official"
    assert all(type(official[k]) is float for k in (*captions.CAPTION_METRICS, "Average"))
    clean = caption_scores(preds, refs, mode="clean", meteor_score=1.0)
    assert clean["CIDEr"] == official["CIDEr"]              # the seven numbers do not change
    assert clean["Average"] == pytest.approx(100.0)         # CIDEr enters the mean as 1000 / 10
    assert clean["mode"] == "clean"


def test_caption_input_errors():
    with pytest.raises(ValueError, match="2 predictions but 1 reference lists"):
        caption_scores(["a", "b"], [["a"]], meteor_score=0.5)
    with pytest.raises(ValueError, match="caption 0: references must be a non-empty list"):
        caption_scores(["a"], [[]], meteor_score=0.5)
    with pytest.raises(ValueError, match="caption 0: references must be a non-empty list"):
        caption_average(["a"], ["a"])
    with pytest.raises(ValueError, match="no captions to score"):
        caption_average([], [])
    with pytest.raises(ValueError, match="unknown scoring mode"):
        caption_average(["a"], [["a"]], mode="fair")
    assert set(CORPUS_RULES) == {"caption_average", "ucit_vizwiz_caption", "ucit_flickr30k"}
    with pytest.raises(ValueError, match=r"'ucit_flickr30k' \(a corpus-level scorer: use caption_average\); "
                                         "registered: anls, "):
        get_rule("ucit_flickr30k")


def test_missing_java_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(captions.shutil, "which", lambda name: None)
    assert any("Java runtime" in m for m in backend_missing())
    with pytest.raises(CaptionBackendError, match="'java' is not on PATH"):
        caption_average(["a dog"], [["a dog"]])


def test_missing_package_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "pycocoevalcap", None)  # makes `import pycocoevalcap` fail
    with pytest.raises(CaptionBackendError, match=r"pycocoevalcap.*mllm-cl\[captions\]"):
        caption_average(["a dog"], [["a dog"]])
    with pytest.raises(CaptionBackendError, match=r"needs the Python package 'pycocoevalcap' \(") as error:
        caption_scores(["a dog"], [["a dog"]], meteor_score=0.5)  # no Java needed for these
    assert "Java" not in str(error.value)


@needs_package
def test_a_failing_java_is_a_clear_error(tmp_path, monkeypatch):
    java = tmp_path / "java"
    java.write_text("#!/bin/sh\nexit 1\n")
    java.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{Path(sys.executable).parent}")
    with pytest.raises(CaptionBackendError, match=r"PTB tokenizer .* returned 1 of 2 lines"):
        captions.ptb_tokenize(["a dog"])
    with pytest.raises(CaptionBackendError, match=r"METEOR \(meteor-1.5.jar\) gave no score"):
        captions.meteor(["a dog"], [["a dog"]])


def test_ptb_tokenizer_works_outside_the_package_folder(monkeypatch):
    """pycocoevalcap's PTBTokenizer writes its input next to its module: here that is a temporary folder."""
    _java_or_skip()
    import pycocoevalcap

    package = Path(next(iter(pycocoevalcap.__path__))).resolve()
    folders = []
    named_temporary_file = tempfile.NamedTemporaryFile

    def spy(*args, **kwargs):
        folders.append(Path(kwargs["dir"]).resolve())
        return named_temporary_file(*args, **kwargs)

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", spy)
    assert captions.ptb_tokenize(["A man (riding) a horse.", "", "Café, au lait!", "two\rlines\u2028here"]) == [
        "a man -lrb- riding -rrb- a horse", "", "café au lait", "two lines here"]
    assert len(folders) == 1 and package not in folders[0].parents


@pytest.mark.slow
def test_caption_average_end_to_end_with_java():
    """PTB tokenizer and METEOR through Java (about 10 s: METEOR loads its paraphrase table).

    The expected numbers were recorded with pycocoevalcap 1.2 and Java 17.
    """
    _java_or_skip()
    preds = ["A man (riding) a horse.", "two dogs playing in the snow"]
    refs = [["A man rides a horse.", "Someone is on a horse, outside!"], ["Two dogs play in snow."]]
    official = caption_average(preds, refs)
    clean = caption_average(preds, refs, mode="clean")
    expected = {
        "official": {"Bleu_1": 61.538461533727826, "Bleu_2": 40.96732451649733, "Bleu_3": 0.00026518211591144525,
                     "Bleu_4": 7.184286839928202e-07, "METEOR": 43.696647682834545, "ROUGE_L": 71.33589415279556,
                     "CIDEr": 214.45155894982335, "Average": 61.712878962317596},
        # the "-lrb-"/"-rrb-" tokens dropped bring the first caption closer to its references
        "clean": {"Bleu_1": 72.72727272066118, "Bleu_2": 49.236596386759715, "Bleu_3": 0.00032595626717129796,
                  "Bleu_4": 9.122775774673749e-07, "METEOR": 87.09278350515466, "ROUGE_L": 76.96969696969698,
                  "CIDEr": 235.21928237481532, "Average": 44.22122924118554},
    }
    for scores in (official, clean):
        assert {k: v for k, v in scores.items() if k != "mode"} == pytest.approx(expected[scores["mode"]], abs=1e-6)
        seven = [scores[k] for k in captions.CAPTION_METRICS]
        cider_weight = 1 if scores["mode"] == "official" else 0.1
        assert scores["Average"] == pytest.approx((sum(seven[:-1]) + seven[-1] * cider_weight) / 7)
    assert (official["mode"], clean["mode"]) == ("official", "clean")
