"""Caption scoring: BLEU-1..4, METEOR, ROUGE-L, CIDEr and their average (UCIT VizWiz-Caption, Flickr30k).

The official rule is MCITlib's ``llava/eval/CoIN/eval_caption.py`` (Prism's
``backbone/shared/eval/eval_caption.py`` is the same): the COCO caption
evaluation (``pycocoevalcap.eval.COCOEvalCap``), then the mean of the seven
numbers ``Bleu_1, Bleu_2, Bleu_3, Bleu_4, METEOR, ROUGE_L, CIDEr``, each x100.

Every number comes from pycocoevalcap's own classes, the optional extra
``captions`` (``pip install 'mllm-cl[captions]'``):

- ``PTBTokenizer`` (the Stanford PTB tokenizer jar, lower-cased, punctuation
  tokens dropped) and ``Meteor`` (``meteor-1.5.jar``, corpus score) are Java
  programs and need a Java runtime; ``caption_average`` runs them.
- ``Bleu(4)``, ``Rouge`` and ``Cider`` are pure Python: ``caption_scores``
  computes them on already tokenized captions without Java.

Missing parts raise ``CaptionBackendError`` naming them. Around the
package, in both modes: ``PTBTokenizer`` writes its input file next to its
own module file and runs the jar there, so ``ptb_tokenize`` loads that
module with its file in a temporary folder holding a link to the jar (an
installed package may be read-only); line breaks inside a caption become
spaces, as pycocoevalcap does for ``\\n`` only (any other one would shift the
later captions onto the wrong images).

Official quirks and what ``clean`` changes:

- The "Average" is a mean of seven percentages although CIDEr is on a 0-10
  scale, so CIDEr x100 can reach 1000 and the average can exceed 100.
  ``clean`` averages with CIDEr x10 instead (its 0-10 scale mapped to 0-100);
  the seven numbers themselves are the same in both modes.
- The tokenizer's bracket tokens ``-lrb- -rrb- -lsb- -rsb- -lcb- -rcb-`` are
  not removed, because pycocoevalcap's punctuation list has them in upper
  case while the tokenizer lower-cases them; ``clean`` removes them.
- (File level, not reproduced: the script gives predictions image ids 1..N
  in file order, so they must be in the annotation file's order.)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from mllm_cl.eval.common import check_mode

CAPTION_METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")

_LINE_BREAKS = str.maketrans(dict.fromkeys("\r\v\f\u2028\u2029", " "))
_BRACKET_TOKENS = frozenset(["-lrb-", "-rrb-", "-lsb-", "-rsb-", "-lcb-", "-rcb-"])
_PACKAGE = "the Python package 'pycocoevalcap' (install the optional extra: pip install 'mllm-cl[captions]')"
_JAVA = "a Java runtime ('java' is not on PATH; METEOR and the PTB tokenizer are Java programs, Java 8 or later)"


class CaptionBackendError(RuntimeError):
    """A part of caption scoring (the pycocoevalcap package, Java) is missing or failed."""


def backend_missing() -> list[str]:
    """What caption_average lacks on this machine (empty when it can run)."""
    return _missing(java=True)


def _missing(*, java: bool) -> list[str]:
    missing = []
    try:
        import pycocoevalcap  # noqa: F401
    except ImportError:
        missing.append(_PACKAGE)
    if java and shutil.which("java") is None:
        missing.append(_JAVA)
    return missing


def _require(*, java: bool) -> None:
    missing = _missing(java=java)
    if missing:
        raise CaptionBackendError("caption scoring needs " + " and ".join(missing))


def _ptb_tokenizer(folder: Path) -> Any:
    """pycocoevalcap's ``PTBTokenizer``, loaded so that it runs its jar and writes its input file in ``folder``.

    The class locates both through its module's ``__file__``; the package's
    module source runs here with ``__file__`` in ``folder``, where the jar is
    linked (copied where links are not allowed).
    """
    from pycocoevalcap.tokenizer import ptbtokenizer

    source = Path(ptbtokenizer.__file__)
    jar = source.with_name(ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR)
    try:
        os.symlink(jar, folder / jar.name)
    except OSError:
        shutil.copyfile(jar, folder / jar.name)
    namespace = {"__name__": "mllm_cl_ptbtokenizer", "__file__": str(folder / source.name)}
    exec(compile(source.read_text(encoding="utf-8"), str(source), "exec"), namespace)
    return namespace["PTBTokenizer"]()


def ptb_tokenize(captions: list[str]) -> list[str]:
    """Captions as pycocoevalcap's ``PTBTokenizer`` leaves them: lower-cased, split, punctuation tokens dropped.

    The tokenizer writes one caption per line and replaces ``\\n`` by a space;
    the jar also ends lines at ``\\r \\v \\f U+2028 U+2029``, which would
    shift every later caption onto the wrong image, so these become spaces
    too. A last caption ``x`` goes along to check that the lines came back in
    place (the tokenizer returns empty captions when Java fails).
    """
    _require(java=True)
    if not captions:
        return []
    lines = [c.translate(_LINE_BREAKS) for c in captions] + ["x"]
    with tempfile.TemporaryDirectory() as tmp:
        tokenized = _ptb_tokenizer(Path(tmp)).tokenize({i: [{"caption": c}] for i, c in enumerate(lines)})
    if tokenized.get(len(captions)) != ["x"]:
        raise CaptionBackendError(f"the PTB tokenizer (stanford-corenlp-3.4.1.jar) returned {len(tokenized)} of "
                                  f"{len(lines)} lines or not in place; is Java working?")
    return [tokenized[i][0] for i in range(len(captions))]


def meteor(tokenized_predictions: list[str], tokenized_references: list[list[str]]) -> float:
    """Corpus METEOR (0-1) of tokenized captions from pycocoevalcap's ``Meteor`` (``meteor-1.5.jar``).

    The jar aggregates its statistics over the corpus: the score is not the
    mean of the per-caption scores.
    """
    _require(java=True)
    _check_inputs(tokenized_predictions, tokenized_references)
    from pycocoevalcap.meteor.meteor import Meteor

    scorer = Meteor()  # starts the JVM; the object's finalizer stops it
    try:
        score, _ = scorer.compute_score(*_coco_dicts(tokenized_predictions, tokenized_references))
    except (ValueError, OSError) as e:
        if scorer.lock.locked():  # compute_score keeps it when the jar fails; the finalizer would wait for it
            scorer.lock.release()
        with contextlib.suppress(OSError):  # a dead JVM's pipe; the finalizer's own close is then a no-op
            scorer.meteor_p.stdin.close()
        raise CaptionBackendError(f"METEOR (meteor-1.5.jar) gave no score ({e}); is Java working "
                                  "(the jar asks for a 2 GB heap)?") from None
    return float(score)


def _coco_dicts(predictions: list[str], references: list[list[str]]) -> tuple[dict, dict]:
    """The ``gts`` (references) and ``res`` (one prediction each) dicts that pycocoevalcap's scorers take."""
    return dict(enumerate(map(list, references))), {i: [p] for i, p in enumerate(predictions)}


def _check_inputs(predictions: list[str], references: list[list[str]]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists")
    if not predictions:
        raise ValueError("no captions to score")
    for i, refs in enumerate(references):
        if isinstance(refs, str) or not refs:
            raise ValueError(f"caption {i}: references must be a non-empty list of strings, got {refs!r}")


def caption_scores(tokenized_predictions: list[str], tokenized_references: list[list[str]], *, meteor_score: float,
                   mode: str = "official") -> dict[str, float | str]:
    """The seven numbers (x100) and their average from *tokenized* captions, without Java.

    BLEU-1..4, ROUGE-L and CIDEr come from pycocoevalcap's ``Bleu(4)``,
    ``Rouge`` and ``Cider``; ``meteor_score`` is the corpus METEOR (0-1,
    from ``meteor``). The average follows ``mode`` (see the module docstring).
    """
    check_mode(mode)
    _check_inputs(tokenized_predictions, tokenized_references)
    _require(java=False)
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    gts, res = _coco_dicts(tokenized_predictions, tokenized_references)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    out: dict[str, float | str] = {f"Bleu_{n}": 100 * float(b) for n, b in enumerate(bleu, 1)}
    out["METEOR"] = 100 * float(meteor_score)
    out["ROUGE_L"] = 100 * float(Rouge().compute_score(gts, res)[0])
    out["CIDEr"] = 100 * float(Cider().compute_score(gts, res)[0])
    values = [float(out[k]) for k in CAPTION_METRICS]
    if mode == "clean":
        values[-1] /= 10  # CIDEr's 0-10 scale onto 0-100 like the others
    out["Average"] = sum(values) / len(values)
    out["mode"] = mode
    return out


def caption_average(predictions: list[str], references: list[list[str]], *, mode: str = "official") -> dict:
    """UCIT caption score: BLEU-1..4, METEOR, ROUGE-L, CIDEr (each x100), their "Average", and the mode.

    Corpus-level (CIDEr's weights depend on all references), so this takes
    every prediction with its list of reference captions. Needs the
    ``captions`` extra and Java (``CaptionBackendError`` otherwise).
    """
    check_mode(mode)
    _check_inputs(predictions, references)
    _require(java=True)
    flat = [r for refs in references for r in refs]
    # one tokenizer run (one JVM) for both: -preserveLines tokenizes each line on its own, as COCOEvalCap's two runs
    tokenized_all = ptb_tokenize(flat + list(predictions))
    tokenized_flat, tokenized_predictions = tokenized_all[:len(flat)], tokenized_all[len(flat):]
    if mode == "clean":
        tokenized_flat = [_drop_brackets(c) for c in tokenized_flat]
        tokenized_predictions = [_drop_brackets(c) for c in tokenized_predictions]
    tokenized_references, i = [], 0
    for refs in references:
        tokenized_references.append(tokenized_flat[i:i + len(refs)])
        i += len(refs)
    score = meteor(tokenized_predictions, tokenized_references)
    return caption_scores(tokenized_predictions, tokenized_references, meteor_score=score, mode=mode)


def _drop_brackets(caption: str) -> str:
    return " ".join(w for w in caption.split(" ") if w not in _BRACKET_TOKENS)


__all__ = ["CAPTION_METRICS", "CaptionBackendError", "backend_missing", "caption_average", "caption_scores", "meteor",
           "ptb_tokenize"]
