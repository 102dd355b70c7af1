"""A table of answer extraction + verification cases, with the reward each verifying built-in gives.

Columns: completion, reference (a bare answer or a worked solution), math_verify reward, exact_match
reward. math_verify judges mathematical equality (2√3 = √12); exact_match judges normalised equality
(numbers by value, strings after dropping TeX spacing, \\text{}, units after a number).
All math_verify cases are scored in one batch (one trip through the worker pool).
"""

from __future__ import annotations

import pytest

from apo_cli.rewards.builtin import exact_match, math_verify
from apo_cli.rewards.extract import extract_answer, extract_gold

CASES: list[tuple[str, str, str, float | None, float | None]] = [
    # id, completion, reference, math_verify, exact_match
    ("boxed-int", r"\boxed{5}", "5", 1.0, 1.0),
    ("boxed-in-sentence", r"The answer is \boxed{5}.", "5", 1.0, 1.0),
    ("boxed-in-math", r"So $x = \boxed{5}$.", "5", 1.0, 1.0),
    ("frac", r"\boxed{\frac{1}{2}}", r"\frac{1}{2}", 1.0, 1.0),
    ("frac-vs-decimal", r"\boxed{0.5}", r"\frac{1}{2}", 1.0, 1.0),
    ("dfrac-vs-short-frac", r"\boxed{\dfrac{1}{2}}", r"\frac12", 1.0, 1.0),
    ("unreduced-frac", r"\boxed{\frac{2}{4}}", r"\frac{1}{2}", 1.0, 1.0),
    ("frac-equals-int", r"\boxed{\frac{6}{3}}", "2", 1.0, 1.0),
    ("nested-braces", r"\boxed{\frac{\sqrt{3}}{2}}", r"\frac{\sqrt{3}}{2}", 1.0, 1.0),
    ("radical-forms", r"\boxed{2\sqrt{3}}", r"\sqrt{12}", 1.0, 0.0),  # equal maths, different strings
    ("slash-vs-frac", r"\boxed{\sqrt{2}/2}", r"\frac{\sqrt{2}}{2}", 1.0, 0.0),
    ("power-vs-int", r"\boxed{1024}", "2^{10}", 1.0, 0.0),
    ("wrong-frac", r"\boxed{\frac{1}{3}}", r"\frac{1}{2}", 0.0, 0.0),
    ("negative", r"\boxed{-3}", "-3", 1.0, 1.0),
    ("sign-wrong", r"\boxed{-3}", "3", 0.0, 0.0),
    ("last-box-wins", r"First \boxed{3}, but correcting myself: \boxed{4}", "4", 1.0, 1.0),
    ("last-box-wrong", r"\boxed{4} hmm, no: \boxed{3}", "4", 0.0, 0.0),
    ("truncated-last-box", r"\boxed{4} and finally \boxed{5", "5", 0.0, 0.0),  # unclosed: no answer
    ("empty-box", r"\boxed{}", "4", 0.0, 0.0),
    ("boxed-no-braces", r"\boxed 7", "7", 1.0, 1.0),
    ("fbox", r"\fbox{8}", "8", 1.0, 1.0),
    ("no-answer", "I think it is four.", "4", 0.0, 0.0),
    ("empty-completion", "", "4", 0.0, 0.0),
    ("answer-tags", "<answer>42</answer>", "42", 1.0, 1.0),
    ("answer-tags-math", r"<answer>$\frac{3}{4}$</answer>", "0.75", 1.0, 1.0),
    ("answer-tags-boxed", r"<answer>\boxed{6}</answer>", "6", 1.0, 1.0),
    ("box-beats-tags", r"\boxed{3} <answer>4</answer>", "4", 0.0, 0.0),  # priority: box, tags, phrase
    ("answer-is", "So the answer is 7.", "7", 1.0, 1.0),
    ("final-answer-colon", "The final answer is: $12$", "12", 1.0, 1.0),
    ("answer-colon-decimal", "Answer: 3.5", r"\frac{7}{2}", 1.0, 1.0),
    ("answer-is-units", "The answer is 12 apples.", "12", 1.0, 1.0),
    ("answer-is-last-phrase", "My first answer is 3.\nAfter checking, the answer is 5.", "5", 1.0, 1.0),
    ("units-text", r"\boxed{5\text{ cm}}", "5", 1.0, 1.0),
    ("degrees", r"\boxed{30^\circ}", "30", 1.0, 1.0),
    ("dollars", r"\boxed{\$5}", "5", 1.0, 1.0),
    ("thousands", r"\boxed{1,000}", "1000", 1.0, 1.0),
    ("percent", r"\boxed{10\%}", "10", 1.0, 0.0),  # math-verify reads 10% as 10 here
    ("tuple", r"\boxed{(1, 2)}", "(1,2)", 1.0, 1.0),
    ("interval", r"\boxed{[1, 3)}", "[1,3)", 1.0, 1.0),
    ("solution-set-order", r"\boxed{3, -3}", "-3, 3", 1.0, 0.0),
    ("assignment", r"\boxed{x=5}", "5", 1.0, 1.0),
    ("pi", r"\boxed{9\pi}", r"9\pi", 1.0, 1.0),
    ("pi-decimal-too-coarse", r"\boxed{28.274}", r"9\pi", 0.0, 0.0),
    ("choice-text", r"\boxed{\text{(B)}}", r"\text{(B)}", 1.0, 1.0),
    ("math-solution-gold", r"\boxed{9}", r"Hence $3^2 = \boxed{9}$.", 1.0, 1.0),
    ("math-solution-nested-gold", r"\boxed{\frac{5}{6}}", r"$\frac36+\frac26=\boxed{\frac{5}{6}}$.", 1.0, 1.0),
    ("gsm-gold", r"\boxed{18}", "She sells 16 - 3 - 4 = 9 eggs, so 9 * 2 = 18 dollars.\n#### 18", 1.0, 1.0),
    ("unparseable-gold", r"\boxed{3}", r"\boxed{}", None, None),  # a broken reference is no judgement
]


@pytest.fixture(scope="module")
def scored() -> tuple[list, list]:
    completions = [c[1] for c in CASES]
    golds = [c[2] for c in CASES]
    return math_verify(completions, golds, timeout_s=10.0), exact_match(completions, golds)


def test_table_is_big_enough():
    assert len(CASES) >= 40
    assert len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("i", range(len(CASES)), ids=[c[0] for c in CASES])
def test_math_verify(scored, i):
    name, completion, gold, expected, _ = CASES[i]
    assert scored[0][i] == expected, f"{name}: extracted {extract_answer(completion)!r} vs {extract_gold(gold)!r}"


@pytest.mark.parametrize("i", range(len(CASES)), ids=[c[0] for c in CASES])
def test_exact_match(scored, i):
    name, completion, gold, _, expected = CASES[i]
    assert scored[1][i] == expected, f"{name}: extracted {extract_answer(completion)!r} vs {extract_gold(gold)!r}"


def test_counts_say_why(scored):
    mv, em = scored
    assert mv.counts["gold_parse_failures"] == 1  # the unparseable-gold row
    assert mv.counts["no_answer"] == 4  # truncated-last-box, empty-box, no-answer, empty-completion
    assert em.counts["gold_missing"] == 1
    # correctness flags follow the values: None where there is no judgement
    assert [c for c in mv.correct] == [None if v is None else v == 1.0 for v in mv]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (r"\boxed{\frac{a}{b}}", r"\frac{a}{b}"),
        (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),  # escaped braces do not close the box
        (r"\boxedfoo{1} \boxed{2}", "2"),
        (r"\boxed{1} \boxedfoo{2}", "1"),
        ("<answer> 12 </answer>", "12"),
        ("The answer isn't obvious. Answer: 4", "4"),
        ("answer = 3.25", "3.25"),
        ("no answer here", None),
    ],
)
def test_extract_answer_details(text, expected):
    assert extract_answer(text) == expected
