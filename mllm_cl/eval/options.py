"""Reading the option letter a multiple-choice answer names.

Extractors:

- ``coin_option_letter`` -- zackschen/CoIN ``llava/eval/CoIN/eval_science_qa.py`` (2412675; the ``ETrain/``
  copy agrees): the text if it is exactly one of ``A``-``E``; else its first character if
  it is one of ``A``-``E`` followed by ``". "``; else the first
  one-character word of any kind (letter, digit or underscore), upper-cased.
  So ``"I think it is B"`` answers ``I``, ``"a cat"`` answers ``A`` and
  ``"(b)"`` answers ``B``.
- ``llava_option_letter`` -- LLaVA's ScienceQA evaluator as MCITlib
  (``llava/eval/CoIN/eval_science_qa.py``) and Prism
  (``backbone/shared/eval/eval_unified.py``) ship it: exactly ``A``-``E``;
  or ``A``-``E`` followed by ``". "``; or the phrase ``The answer is X``
  followed by any one character, found exactly once (case-sensitive). So
  ``"B."``, ``"(B)"``, ``"b"`` and a final ``"The answer is B"`` with
  nothing after it are all unreadable.
- ``clean_option_letter`` -- the letter a reader would take: a bare letter
  with optional brackets and a closing ``.``, ``)`` or ``:`` (lower case
  accepted when it is the whole answer), a leading ``"B. ..."``/``"(B) ..."``,
  or ``answer``/``option``/``choice`` followed by a letter anywhere (a small
  letter only bracketed or ending the sentence, so ``"the answer is a cat"``
  names nothing); failing those, the option whose text the answer repeats. With the prompt's options
  known, a letter outside them is no answer.
- ``option_letter`` -- the generic ``option_accuracy`` rule's extractor.
"""

from __future__ import annotations

import re

from mllm_cl.eval.common import clean_text

SCIENCEQA_OPTIONS = ("A", "B", "C", "D", "E")

_ONE_CHAR_WORD = re.compile(r"(?<!\w)(\w)(?!\w)")
_LLAVA_PHRASE = re.compile(r"The answer is ([A-Z]).")


def coin_option_letter(text: str) -> str | None:
    """The letter CoIN's ScienceQA script reads from ``text`` (any one-character word), or None."""
    if text in SCIENCEQA_OPTIONS:
        return text
    if len(text) >= 3 and text[0] in SCIENCEQA_OPTIONS and text[1:3] == ". ":
        return text[0]
    m = _ONE_CHAR_WORD.search(text)
    return m.group(1).upper() if m else None


def llava_option_letter(text: str) -> str | None:
    """The letter LLaVA's ScienceQA evaluator (MCITlib, Prism) reads from ``text``, or None."""
    if text in SCIENCEQA_OPTIONS:
        return text
    if len(text) >= 3 and text[0] in SCIENCEQA_OPTIONS and text[1:3] == ". ":
        return text[0]
    found = _LLAVA_PHRASE.findall(text)
    return found[0] if len(found) == 1 else None


_OPTION_LINE = re.compile(r"^\s*\(?([A-Z])[.):]\s+(\S.*?)\s*$")
_OPTION_INLINE = re.compile(r"\(([A-Z])\)\s*(.*?)(?=\s*\([A-Z]\)|$)", re.DOTALL)


def parse_options(prompt: str) -> dict[str, str]:
    """The options a prompt lists, ``{"A": text, ...}``; empty when it lists none readably.

    Reads one option per line (``A. text``, ``(A) text``, ``A) text``,
    ``A: text``) or inline ``(A) text (B) text``; the letters must run
    ``A``, ``B``, ``C``... without gaps.
    """
    lines = {}
    for line in prompt.splitlines():
        m = _OPTION_LINE.match(line)
        if m and m.group(1) not in lines:
            lines[m.group(1)] = m.group(2)
    inline = {m.group(1): m.group(2).strip() for m in _OPTION_INLINE.finditer(prompt)}
    for found in (lines, inline):
        letters = sorted(found)
        if len(letters) >= 2 and letters == [chr(ord("A") + i) for i in range(len(letters))]:
            return dict(sorted(found.items()))
    return {}


_CLEAN_WHOLE = re.compile(r"^[(\[]?([A-Za-z])[)\]]?[.:)]?$")
_CLEAN_LEADING = re.compile(r"^(?:[(\[]([A-Z])[)\]]|([A-Z])[.:)])(?:\s|$)")
# "answer"/"option"/"choice" (any case), a separator, then a bracketed letter, a capital letter standing alone,
# or a small letter that ends the sentence ("the answer is b." but not "the answer is a cat").
_CLEAN_PHRASE = re.compile(r"\b(?i:answer|option|choice)(?:\s+(?i:is)\s*:?\s*|\s*[:\-]\s*|\s+)"
                           r"(?:[(\[]([A-Za-z])[)\]]|([A-Z])(?![\w'])|([a-z])(?=\s*(?:[.,;:!]|$)))")


def clean_option_letter(text: str, options: dict[str, str] | None = None) -> str | None:
    """The option letter ``text`` names, restricted to ``options`` when they are known, or None."""
    text = text.strip()
    letter = None
    m = _CLEAN_WHOLE.match(text)
    if m:
        letter = m.group(1).upper()
    else:
        m = _CLEAN_LEADING.match(text)
        if m:
            letter = m.group(1) or m.group(2)
        else:
            m = _CLEAN_PHRASE.search(text)
            if m:
                letter = next(g for g in m.groups() if g).upper()
    if letter is None and options:
        said = clean_text(text)
        matches = [k for k, v in options.items() if clean_text(v) == said]
        letter = matches[0] if len(matches) == 1 else None
    if letter is not None and options and letter not in options:
        return None
    return letter


def gold_letter(answer: str | int) -> str | None:
    """The option letter a test row's answer holds (``"B"``, ``"(B)"``, ``"B."``, ``1`` -> ``"B"``), or None."""
    if isinstance(answer, int):
        return chr(ord("A") + answer) if 0 <= answer < 26 else None
    m = re.fullmatch(r"\s*[(\[]?([A-Za-z])[)\]]?[.:]?\s*", answer)
    return m.group(1).upper() if m else None


_LETTER = [
    re.compile(r"^\(?([A-Z])\)?[.:)]?$"),  # "B", "B.", "(B)", "B)"
    re.compile(r"^\(?([A-Z])\)?[.:)]\s"),  # "B. the circle"
    re.compile(r"\banswer is:?\s*\(?([A-Z])\b\)?", re.IGNORECASE),  # "The answer is B"
]


def option_letter(text: str) -> str | None:
    """The option letter a prediction names (generic rule): ``B``, ``B.``, ``(B)``, ``B. text``, ``the answer is B``."""
    text = text.strip()
    for pattern in _LETTER:
        m = pattern.search(text)
        if m:
            return m.group(1).upper()
    return None
