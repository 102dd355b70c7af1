"""Final-answer extraction and light normalisation, in plain Python (no sympy, no regex backtracking traps).

Everything here is cheap and total: it never raises on odd text and never runs long, so rewards can
call it in-process. The expensive, possibly unbounded step (symbolic equivalence) lives in
:mod:`apo_cli.rewards.verify`, behind a killable worker process.

Which answer counts, in priority order (the first rule that finds something wins):

1. the LAST ``\\boxed{...}`` (or ``\\fbox{...}``) with balanced braces — a truncated last box
   (``\\boxed{12`` at the end of a cut-off completion) is not an answer, rather than silently falling
   back to an earlier, intermediate box;
2. the content of the last ``<answer>...</answer>`` pair;
3. the last "answer is X" / "answer: X" phrase, up to the end of its line or sentence.

Priority rather than position, because models often restate the question after boxing, and a
trailing "the answer is correct because..." must not override an explicit box.
"""

from __future__ import annotations

import re
from fractions import Fraction

_BOX_COMMANDS = ("\\boxed", "\\fbox")
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
# "the final answer is 12." / "Answer: 12" / "answer = 12"; the value runs to the end of the line.
_ANSWER_PHRASE = re.compile(r"answer\s*(?:is\b|:|=)[ \t:]*([^\n]*)", re.IGNORECASE)
_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)")
_THOUSANDS = re.compile(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_NUMBER_THEN_WORDS = re.compile(r"([-+]?(?:\d[\d,]*(?:\.\d+)?|\.\d+))\s+[A-Za-z][A-Za-z ]*\.?")
_FRAC = re.compile(r"([-+]?)\\[dt]?frac\{([^{}]+)\}\{([^{}]+)\}")
_SHORT_FRAC = re.compile(r"([-+]?)\\[dt]?frac(\d)(\d)")


def _balanced(text: str, open_at: int) -> int | None:
    """Index just past the brace that closes the one at ``open_at``, or None if it never closes."""
    depth = 0
    i = open_at
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text) and text[i + 1] in "{}":
            i += 2  # an escaped brace \{ or \} does not count
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return None


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}``/``\\fbox{...}`` in ``text`` (nested braces kept), else None.

    ``\\boxed 5`` (no braces) yields ``5``. A last box whose braces never close yields None.
    """
    start = max(text.rfind(cmd) for cmd in _BOX_COMMANDS)
    if start < 0:
        return None
    cmd = next(c for c in _BOX_COMMANDS if text.startswith(c, start))
    i = start + len(cmd)
    if i < len(text) and text[i].isalpha():  # \boxedfoo is another macro
        return last_boxed(text[:start])
    while i < len(text) and text[i] == " ":
        i += 1
    if i < len(text) and text[i] == "{":
        end = _balanced(text, i)
        return None if end is None else text[i + 1 : end - 1].strip()
    m = re.match(r"[^\s$]+", text[i:])
    return m.group(0) if m else None


def _phrase_answer(text: str) -> str | None:
    """The value of the last "answer is X" phrase, cut at the end of its sentence."""
    matches = list(_ANSWER_PHRASE.finditer(text))
    for m in reversed(matches):
        value = m.group(1)
        # a period followed by a space ends the sentence; "3.5" keeps its decimal point
        cut = re.search(r"\.(?:\s|$)", value)
        if cut:
            value = value[: cut.start()]
        value = strip_math_delimiters(value.strip())
        if value:
            return value
    return None


def strip_math_delimiters(s: str) -> str:
    """Remove surrounding ``$...$``, ``\\(...\\)``, ``\\[...\\]`` and a trailing period."""
    s = s.strip()
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if s.startswith(left) and s.endswith(right) and len(s) >= len(left) + len(right):
            s = s[len(left) : len(s) - len(right)].strip()
    return s.rstrip(".").strip()


def last_number(text: str) -> str | None:
    """The last number in ``text`` (thousands separators allowed), or None."""
    found = [m.group(0) for m in re.finditer(r"[-+]?\d[\d,]*(?:\.\d+)?|[-+]?\.\d+", text)]
    return found[-1].replace(",", "").rstrip(".") if found else None


def extract_answer(text: str, *, fallback_last_number: bool = False) -> str | None:
    """The completion's final answer as a string (see the module docstring for the rules), or None.

    With ``fallback_last_number``, a completion without a box, tags or an "answer is" phrase is
    answered by its last number ("5 + 6 = 11" -> "11"), as short-answer tasks expect.
    """
    if not text:
        return None
    if fallback_last_number and not any(cmd in text for cmd in _BOX_COMMANDS) \
            and not _ANSWER_TAG.search(text) and _phrase_answer(text) is None:
        return last_number(text)
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed or None
    tags = _ANSWER_TAG.findall(text)
    if tags:
        inner = strip_math_delimiters(tags[-1])
        return inner or None
    phrase = _phrase_answer(text)
    if phrase is None:
        return None
    # "answer is 18 apples" -> "18": drop trailing unit words after a plain number
    m = _NUMBER_THEN_WORDS.fullmatch(phrase)
    return m.group(1) if m else phrase


def extract_gold(answer: str) -> str | None:
    """The reference answer: the last box of a worked solution (MATH), else the whole string."""
    if answer is None:
        return None
    text = str(answer)
    if any(cmd in text for cmd in _BOX_COMMANDS):
        return last_boxed(text)
    text = strip_math_delimiters(text)
    # GSM8K-style "#### 42" at the end of a worked solution
    if "####" in text:
        text = text.rsplit("####", 1)[1].strip()
    return text or None


def normalize_answer(s: str) -> str:
    """A canonical string form for exact matching: no TeX spacing, wrappers, units-after-numbers or case."""
    s = strip_math_delimiters(s)
    s = re.sub(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}", r"\1", s)
    s = s.replace("\\left", "").replace("\\right", "")
    s = re.sub(r"\\[,;:! ]", "", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("\\$", "")
    s = re.sub(r"\^\s*\{?\\circ\}?|°", "", s)
    s = re.sub(r"\s+", " ", s).strip().rstrip(".").strip()
    m = re.fullmatch(r"[A-Za-z]\s*=\s*(.+)", s)  # "x = 5" -> "5"
    if m:
        s = m.group(1)
    m = _NUMBER_THEN_WORDS.fullmatch(s)
    if m:
        s = m.group(1)
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    return s.replace(" ", "").lower()


def parse_number(s: str) -> Fraction | None:
    """``s`` as an exact rational (integers, decimals, ``a/b``, ``\\frac{a}{b}``, percent-free), else None."""
    t = normalize_answer(s)
    if _NUMBER.fullmatch(t):
        return Fraction(t)
    m = _FRAC.fullmatch(t) or _SHORT_FRAC.fullmatch(t)
    if m is None:
        m = re.fullmatch(r"([-+]?)(\d+)/(\d+)", t)
    if m is None:
        return None
    sign, num, den = m.groups()
    if not (_NUMBER.fullmatch(num) and _NUMBER.fullmatch(den)) or Fraction(den) == 0:
        return None
    value = Fraction(num) / Fraction(den)
    return -value if sign == "-" else value


def answers_equal(pred: str, gold: str) -> bool:
    """Exact equality after normalisation; numbers compare by value (``42`` = ``42.0``, ``1/2`` = ``0.5``)."""
    a, b = parse_number(pred), parse_number(gold)
    if a is not None and b is not None:
        return a == b
    return normalize_answer(pred) == normalize_answer(gold)


def ngram_repetition(tokens: list, n: int = 4) -> float:
    """Fraction of the sequence's n-grams that repeat an earlier one: ``1 - unique / total`` (0 if none)."""
    total = len(tokens) - n + 1
    if total <= 0:
        return 0.0
    unique = len({tuple(tokens[i : i + n]) for i in range(total)})
    return 1.0 - unique / total
