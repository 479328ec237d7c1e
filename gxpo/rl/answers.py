"""Answer matching: extraction, normalisation, numbers, and equivalence of two answers.

Pure functions of strings, what the verifier worker processes import (``gxpo.rl.rewards``
runs :func:`math_verify_equal` in them under a hard deadline). Two kinds of comparison:

- math (MATH, Math-500, AMC23, Minerva Math, OlympiadBench): :func:`fast_math_equal` decides
  what string and number matching can, :func:`math_verify_equal` (``math-verify``:
  fractions, radicals, intervals, sets, units, text answers, ...) the rest.
- numeric (GSM8K, the arithmetic task): :func:`numeric_equal`, a number compared
  numerically, tolerant of ``1,000``, ``$``, ``%`` and ``18.00``.
"""

from __future__ import annotations

import functools
import re
from fractions import Fraction

# ---------------------------------------------------------------------------------------------
# Extraction.

_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_FINAL_RES = (
    re.compile(r"(?im)^[ \t>*]*#{4}[ \t]*([^\sA-Za-z#].*)$"),  # "#### 18", not a "#### Step" header
    re.compile(r"(?i)final answer(?:[ \t]+is)?[ \t]*[:=]?[ \t]*(.+)"),
    re.compile(r"(?i)the answer is[ \t]*[:=]?[ \t]*(.+)"),
    re.compile(r"(?im)^[ \t>*]*answer[ \t]*\**[ \t]*:[ \t]*\**[ \t]*(.+)"),
)
# A number not glued to a preceding word, digit or dot (so "3-5" yields 5, not -5).
_NUMBER_RE = re.compile(r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?![\d])")
_MATH_DELIMS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))


def _braced(text: str, open_pos: int) -> str | None:
    """The content of the brace group opening at ``open_pos``; None when never closed."""
    depth = 0
    i = open_pos
    n = len(text)
    while i < n:
        ch = text[i]
        if ch == "\\":  # \{ and \} are literal braces, not grouping
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[open_pos + 1 : i]
        i += 1
    return None


def extract_boxed(text: str) -> str | None:
    """Content of the last complete ``\\boxed{...}`` (or ``\\fbox``) in ``text``, else None.

    Braces nest; an unclosed box (a truncated response) is skipped for an earlier one.
    """
    for match in reversed(list(_BOX_RE.finditer(text))):
        rest = match.end()
        while rest < len(text) and text[rest] == " ":
            rest += 1
        if rest < len(text) and text[rest] == "{":
            content = _braced(text, rest)
            if content is not None:
                return content.strip()
        elif rest > match.end():  # "\boxed 5": the next token
            token = re.match(r"[^\s$]+", text[rest:])
            if token:
                return token.group(0)
    return None


def _clean_final(tail: str) -> str | None:
    """The answer inside the remainder of a final-answer line."""
    tail = tail.strip().strip("*").strip()
    for left, right in _MATH_DELIMS:
        if tail.startswith(left):
            end = tail.find(right, len(left))
            if end > 0:
                return tail[len(left) : end].strip() or None
    tail = re.split(r"\.(?:\s|$)", tail, maxsplit=1)[0]
    return tail.strip().rstrip(".").strip() or None


def _last_number(text: str) -> str | None:
    numbers = _NUMBER_RE.findall(text.replace("\u2212", "-"))
    return numbers[-1] if numbers else None


def extract_answer_and_box(text: str) -> tuple[str | None, bool]:
    """(:func:`extract_answer`, whether it came from a ``\\boxed{}``)."""
    boxed = extract_boxed(text)
    if boxed is not None:
        return boxed, True
    candidates = [m for pattern in _FINAL_RES for m in pattern.finditer(text)]
    for match in sorted(candidates, key=lambda m: m.start(1), reverse=True):
        answer = _clean_final(match.group(1))
        if answer is not None:
            return answer, False
    return _last_number(text), False


def extract_answer(text: str) -> str | None:
    """The final answer of a response.

    The last ``\\boxed{}``; else the last final-answer line ("The answer is ...",
    "Final answer: ...", "#### ..."); else the last number; else None.
    """
    return extract_answer_and_box(text)[0]


# ---------------------------------------------------------------------------------------------
# Normalisation and numbers.

_TEXT_CMD_RE = re.compile(
    r"\\(?:text|textbf|textit|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}"
)
_SUBS = (
    (re.compile(r"\\[dt]frac(?![A-Za-z])"), r"\\frac"),
    (re.compile(r"\\frac(\d)(\d)"), r"\\frac{\1}{\2}"),
    (re.compile(r"\\(?:left|right)(?![A-Za-z])"), ""),
    (re.compile(r"\^\s*\{?\\circ\}?|°"), ""),
    (re.compile(r"\\[!,;: ]|~"), ""),
    (re.compile(r"\\?\$"), ""),
    (re.compile(r"\\%"), "%"),
    (re.compile(r"\s+"), ""),
)
_PLAIN_NUM = r"[-+]?(?:\d+\.?\d*|\.\d+)"
_NUM_RE = re.compile(rf"{_PLAIN_NUM}(?:[eE][-+]?\d+)?")
_THOUSANDS_RE = re.compile(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d*)?")
_SCI_RE = re.compile(rf"({_PLAIN_NUM})(?:\\times|\\cdot|×|\*)10\^\{{?([-+]?\d+)\}}?")
_LATEX_FRAC_RE = re.compile(r"([-+]?)\\frac\{([-+]?\d+)\}\{([-+]?\d+)\}")
_SLASH_FRAC_RE = re.compile(r"([-+]?\d+)/([-+]?\d+)")


def normalize_answer(answer: str) -> str:
    """A canonical string for cheap equality: no spaces, ``$``, ``\\left``, ``\\text{}``, ...

    ``\\dfrac`` and ``\\tfrac`` become ``\\frac``; degree signs and a trailing period go.
    Case is kept (variables are case-sensitive).
    """
    s = answer.strip().replace("\u2212", "-")
    for pattern, repl in _SUBS:
        s = pattern.sub(repl, s)
    previous = None
    while previous != s:  # unwrap nested \text{\textbf{...}}
        previous, s = s, _TEXT_CMD_RE.sub(r"\1", s)
    return s.rstrip(".")


def _number(s: str) -> Fraction | None:
    """A normalised string that is exactly one number, as a Fraction."""
    s = s.removesuffix("%")
    if _THOUSANDS_RE.fullmatch(s):
        s = s.replace(",", "")
    if _NUM_RE.fullmatch(s):
        return Fraction(s)
    if m := _SCI_RE.fullmatch(s):
        return Fraction(m.group(1)) * Fraction(10) ** int(m.group(2))
    if m := _LATEX_FRAC_RE.fullmatch(s):
        sign, numerator, denominator = m.groups()
    elif m := _SLASH_FRAC_RE.fullmatch(s):
        sign, numerator, denominator = "", m.group(1), m.group(2)
    else:
        return None
    if int(denominator) == 0:
        return None
    value = Fraction(int(numerator), int(denominator))
    return -value if sign == "-" else value


def parse_number(answer: str) -> Fraction | None:
    """``answer`` as an exact number when it is one (``1,000``, ``$18.00``, ``\\frac{1}{2}``,
    ``3/4``, ``4.5e33``, ``4.5 \\times 10^{33}``, ``50\\%`` -> 50), else None."""
    return _number(normalize_answer(answer))


def canonical_answer(answer: str | None) -> str | None:
    """A key under which equivalent simple answers agree (for majority voting)."""
    if answer is None:
        return None
    normalized = normalize_answer(answer)
    number = _number(normalized)
    return normalized if number is None else str(number)


def numeric_equal(prediction: str, reference: str) -> bool:
    """Equal as numbers, to a relative 1e-6 (a prediction with words around it gives its last
    number); as normalised strings when either is no number."""
    ref = parse_number(reference)
    pred = parse_number(prediction)
    if pred is None:  # "18 dollars", "x = 18": the last number in it
        last = _last_number(prediction)
        pred = None if last is None else parse_number(last)
    if pred is None or ref is None:
        return normalize_answer(prediction) == normalize_answer(reference)
    return pred == ref or abs(pred - ref) <= Fraction(1, 10**6) * max(1, abs(ref))


def fast_math_equal(prediction: str, reference: str) -> bool | None:
    """True/False when string and number matching decide; None when math-verify has to."""
    pred, ref = normalize_answer(prediction), normalize_answer(reference)
    if not pred or not ref:  # MATH has two empty references
        return False
    if pred == ref:
        return True
    pred_num, ref_num = _number(pred), _number(ref)
    if pred_num is None or ref_num is None:
        return None
    if pred_num == ref_num:
        return True
    # math-verify rounds floats and reads 50% as 0.5: leave near misses and percents to it.
    if "%" in pred or "%" in ref:
        return None
    gap = abs(pred_num - ref_num)
    return None if gap <= Fraction(1, 10**4) * max(1, abs(pred_num), abs(ref_num)) else False


_SCI_E_RE = re.compile(rf"({_PLAIN_NUM})[eE]([-+]?\d+)")


@functools.lru_cache(maxsize=8192)
def _mv_parse(answer: str) -> list:
    """math-verify's parse of one answer; cached since G responses share one reference."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    config = (LatexExtractionConfig(), ExprExtractionConfig())
    return parse(f"\\boxed{{{answer}}}", extraction_config=config, parsing_timeout=None)


def math_verify_equal(prediction: str, reference: str) -> bool:
    """math-verify equivalence of two extracted answers (the default verifier).

    No timeouts of its own: callers bound it (``RewardScorer`` runs it in workers).
    """
    from math_verify import verify

    # math-verify reads "4.5e33" as 4.5 * e * 33 (Minerva writes references so).
    if m := _SCI_E_RE.fullmatch(reference.strip()):
        reference = f"{m.group(1)} \\times 10^{{{m.group(2)}}}"
    return bool(verify(_mv_parse(reference), _mv_parse(prediction), timeout_seconds=None))
