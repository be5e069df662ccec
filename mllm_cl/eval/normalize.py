"""VQA answer normalization, as the VQA/TextVQA evaluators apply it, and a fixed version.

``official_vqa_normalize`` reproduces the ``EvalAIAnswerProcessor`` of the
m4c evaluator that CoIN's TextVQA script imports
(zackschen/CoIN ``llava/eval/CoIN/eval_textvqa.py`` at 2412675, and its
``ETrain/`` copy -> ``m4c_evaluator.py``, itself taken from
facebookresearch/mmf), step by step:

1. lower-case; delete every ``,`` and ``?``; ``'s`` becomes ``" 's"``; strip;
   newlines and tabs become spaces; strip.
2. For each of ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !``: if that
   character appears next to a space anywhere in the (step-1) text, every
   occurrence is deleted, otherwise every occurrence becomes a space. So the
   treatment of a hyphen depends on spacing elsewhere in the answer:
   ``"t-shirt"`` -> ``"t shirt"`` but ``"t-shirt - red"`` -> ``"tshirt red"``.
   (The script also deletes when a digit-comma-digit appears, but step 1 has
   already removed every comma, so that branch never fires.)
3. Delete every period not followed by a digit. The pattern is written
   ``(?!<=\\d)(\\.)(?!\\d)``: the first group is a look-*ahead* for the text
   ``<=`` and a digit, which can never match at a period, so only "not
   followed by a digit" is tested. The substitution is called with
   ``re.UNICODE`` in the *count* position, so at most 32 periods are removed.
4. Split on whitespace; number words ``none`` and ``zero`` .. ``ten`` become
   digits (nothing above ten); the articles ``a``, ``an``, ``the`` are
   dropped; apostrophe-less contractions get their apostrophe from a fixed
   table (whose capitalised keys ``Im``, ``Ive``, ``Id've``, ``I'dve`` can
   never match lower-cased text, and which maps ``somebody'd`` to
   ``somebodyd``).

``clean_vqa_normalize`` fixes these: Unicode NFKC and case folding; thousands
separators removed (``1,000`` -> ``1000``); every other punctuation or
symbol character becomes a space regardless of spacing elsewhere, except
apostrophes inside words; periods are deleted (all of them, ``"a.m."`` ->
``"am"``) except decimal points between digits;
number words up to ninety-nine (``"twenty-one"`` -> ``21``); articles
dropped; the contraction table with lower-case keys and no reversed entry.
"""

from __future__ import annotations

import re
import unicodedata

# --------------------------------------------------------------------------- official

_OFFICIAL_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
                         ",", "?", "!")
_DIGIT_COMMA_DIGIT = re.compile(r"(?<=\d),+(?=\d)")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")  # what the script's pattern actually tests
_OFFICIAL_PERIOD_LIMIT = int(re.UNICODE)  # 32: the flag the script passes where `count` goes
_OFFICIAL_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                     "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = frozenset({"a", "an", "the"})

# The evaluator's contraction table as (written form, replacement) pairs. Kept
# complete, including the entries that cannot fire (capitalised keys) or that
# go the wrong way ("somebody'd" -> "somebodyd"), because official mode must
# behave as the table does.
_OFFICIAL_CONTRACTIONS = dict(pair.split("=") for pair in """
aint=ain't arent=aren't cant=can't couldve=could've couldnt=couldn't couldn'tve=couldn't've couldnt've=couldn't've
didnt=didn't doesnt=doesn't dont=don't hadnt=hadn't hadnt've=hadn't've hadn'tve=hadn't've hasnt=hasn't
havent=haven't hed=he'd hed've=he'd've he'dve=he'd've hes=he's howd=how'd howll=how'll hows=how's
Id've=I'd've I'dve=I'd've Im=I'm Ive=I've isnt=isn't itd=it'd itd've=it'd've it'dve=it'd've itll=it'll
let's=let's maam=ma'am mightnt=mightn't mightnt've=mightn't've mightn'tve=mightn't've mightve=might've
mustnt=mustn't mustve=must've neednt=needn't notve=not've oclock=o'clock oughtnt=oughtn't
ow's'at='ow's'at 'ows'at='ow's'at 'ow'sat='ow's'at shant=shan't shed've=she'd've she'dve=she'd've
she's=she's shouldve=should've shouldnt=shouldn't shouldnt've=shouldn't've shouldn'tve=shouldn't've
somebody'd=somebodyd somebodyd've=somebody'd've somebody'dve=somebody'd've somebodyll=somebody'll
somebodys=somebody's someoned=someone'd someoned've=someone'd've someone'dve=someone'd've
someonell=someone'll someones=someone's somethingd=something'd somethingd've=something'd've
something'dve=something'd've somethingll=something'll thats=that's thered=there'd thered've=there'd've
there'dve=there'd've therere=there're theres=there's theyd=they'd theyd've=they'd've they'dve=they'd've
theyll=they'll theyre=they're theyve=they've twas='twas wasnt=wasn't wed've=we'd've we'dve=we'd've
weve=we've werent=weren't whatll=what'll whatre=what're whats=what's whatve=what've whens=when's
whered=where'd wheres=where's whereve=where've whod=who'd whod've=who'd've who'dve=who'd've wholl=who'll
whos=who's whove=who've whyll=why'll whyre=why're whys=why's wont=won't wouldve=would've wouldnt=wouldn't
wouldnt've=wouldn't've wouldn'tve=wouldn't've yall=y'all yall'll=y'all'll y'allll=y'all'll
yall'd've=y'all'd've y'alld've=y'all'd've y'all'dve=y'all'd've youd=you'd youd've=you'd've
you'dve=you'd've youll=you'll youre=you're youve=you've
""".split())


def official_vqa_normalize(answer: str) -> str:
    """An answer as the m4c/EvalAI answer processor leaves it (see the module docstring)."""
    text = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    before = text
    digit_comma = _DIGIT_COMMA_DIGIT.search(before) is not None
    for p in _OFFICIAL_PUNCTUATION:
        spaced = (p + " ") in before or (" " + p) in before
        text = text.replace(p, "" if spaced or digit_comma else " ")
    text = _PERIOD_NOT_BEFORE_DIGIT.sub("", text, count=_OFFICIAL_PERIOD_LIMIT)
    out = []
    for word in text.lower().split():
        word = _OFFICIAL_NUMBERS.get(word, word)
        if word not in _ARTICLES:
            out.append(word)
    return " ".join(_OFFICIAL_CONTRACTIONS.get(w, w) for w in out)


# --------------------------------------------------------------------------- clean

_UNITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
          "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
_TENS = {"twenty": 20, "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80, "ninety": 90}
_CLEAN_NUMBERS = {w: i for i, w in enumerate(_UNITS)} | {"none": 0} | _TENS
_CLEAN_CONTRACTIONS = {k.lower(): v.lower() for k, v in _OFFICIAL_CONTRACTIONS.items() if k != "somebody'd"}
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")


def _is_kept(text: str, i: int) -> bool:
    """Whether the punctuation character at ``text[i]`` is part of a word or number."""
    ch, prev, nxt = text[i], text[i - 1: i], text[i + 1: i + 2]
    if ch == ".":
        return prev.isdigit() and nxt.isdigit()
    if ch in "'\u2019":
        return prev.isalnum() and nxt.isalnum()
    return False


def _numbers(tokens: list[str]) -> list[str]:
    """Number words as digits; a tens word followed by a unit word is one number."""
    out: list[str] = []
    i = 0
    while i < len(tokens):
        word = tokens[i]
        if word in _TENS and i + 1 < len(tokens) and tokens[i + 1] in _UNITS[1:10]:
            out.append(str(_TENS[word] + _UNITS.index(tokens[i + 1])))
            i += 2
            continue
        out.append(str(_CLEAN_NUMBERS[word]) if word in _CLEAN_NUMBERS else word)
        i += 1
    return out


def clean_vqa_normalize(answer: str) -> str:
    """An answer normalized without the official processor's quirks (see the module docstring)."""
    text = unicodedata.normalize("NFKC", answer).casefold()
    text = _THOUSANDS.sub("", text)
    chars = []
    for i, ch in enumerate(text):
        if _is_kept(text, i):
            chars.append("'" if ch == "\u2019" else ch)
        elif ch == ".":
            chars.append("")  # "a.m." is "am", "yes." is "yes"
        elif unicodedata.category(ch)[0] in "PS":
            chars.append(" ")
        else:
            chars.append(ch)
    tokens = [w for w in _numbers("".join(chars).split()) if w not in _ARTICLES]
    return " ".join(_CLEAN_CONTRACTIONS.get(w, w) for w in tokens)


def vqa_normalize(answer: str, mode: str) -> str:
    """``official_vqa_normalize`` or ``clean_vqa_normalize`` by mode."""
    return official_vqa_normalize(answer) if mode == "official" else clean_vqa_normalize(answer)
