"""Answer extraction, number parsing and canonical keys (the pure matching of answers.py)."""

import pytest

from gxpo.rl.answers import canonical_answer, extract_answer, extract_boxed, parse_number


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"a \boxed{1} then \boxed{\frac{a}{b^{2}}} end", r"\frac{a}{b^{2}}"),
        (r"\fbox{7}", "7"),
        (r"\boxed 5 done", "5"),
        (r"\boxed{\{1,2\}}", r"\{1,2\}"),
        (r"\boxed{3} then truncated \boxed{\frac{1", "3"),
        ("no box", None),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"x \boxed{2} and later The answer is 3", "2"),  # a box wins
        ("The answer is 12. Checking: 3 * 4 = 12, ok 5", "12"),
        ("Final answer: $x^2$ since 3", "x^2"),
        ("**Final Answer**\nThe total is 42 apples", "42"),
        ("work...\n#### 1,234", "1,234"),
        ("#### Step 1\nwe get 7 then 9", "9"),  # a markdown header is not an answer
        ("Answer: -5", "-5"),
        ("3-5 gives 2 then 10", "10"),
        ("nothing", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_parse_number():
    assert parse_number("1,000") == 1000
    assert parse_number(r"\$18.00") == 18
    assert parse_number(r"-\dfrac{3}{4}") == parse_number("-0.75")
    assert parse_number(r"4.5 \times 10^{33}") == parse_number("4.5e33") == 45 * 10**32
    assert parse_number("50\\%") == 50
    assert parse_number("1/0") is None and parse_number("x+1") is None


def test_canonical_answer():
    assert canonical_answer(r"\dfrac12") == canonical_answer("0.5") == canonical_answer("1/2")
    assert canonical_answer(r"\text{east}") == "east"
    assert canonical_answer(None) is None
