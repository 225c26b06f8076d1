"""Strict and lenient answers, and the free-text leak (handrail/data/answers.py)."""

import pytest

from handrail.data.answers import answers_match, extract_answer, last_boxed, lenient, reader_answer, stated_before_work
from handrail.data.verifiers import exact

PROMPT = "Ivy has 62 stickers and gets 6 more. How many stickers does Ivy have now?"


@pytest.mark.parametrize("text, found", [
    ("62 + 6 = 68\n#### 68", "68"),
    ("She has 62 + 6 = 68 stickers.\nThe answer is 68.", "68"),
    ("So the final answer is $\\boxed{1,042}$.", "1042"),
    ("Answer: 17 apples", "17"),
    ("#### 48\nThe answer is 48.\n#### 5\nThe answer is 5.", "5"),  # the last answer it states
    ("The answer is 70, so 62 + 6 = 68", "70"),  # a marked answer beats later unmarked numbers
    ("We get 3, then 12.", "12"),  # no marker: the last number
    ("I cannot tell.", None),
    ("The answer is **yes**.", "yes"),
])
def test_reader_answer_is_where_a_reader_looks(text, found):
    assert reader_answer(text) == found


def test_strict_reads_the_format_and_lenient_reads_the_text():
    assert exact("62 + 6 = 68\n#### 68", "68") and not exact("62 + 6 = 68, so she has 68.", "68")
    assert lenient(exact, "62 + 6 = 68, so she has 68.", "68")
    assert not lenient(exact, "62 + 6 = 69, so she has 69.", "68")
    assert not lenient(exact, "no numbers at all", "68")
    assert answers_match("$1,042.0", "1042") and not answers_match("1042", "104")
    assert extract_answer("a\n#### 4\nb") == "4" and last_boxed("\\boxed{\\frac{1}{2}} and \\boxed{x^{2}}") == "x^{2}"


@pytest.mark.parametrize("completion, leaked", [
    ("The answer is 68. Ivy had 62 stickers and got 6 more.", True),  # stated first, worked after
    ("68", True),  # an answer and no work at all
    ("#### 68\n62 + 6 = 68", True),  # the lab's own form
    ("She has 68 stickers.", True),
    ("The answer is 70.", True),  # a wrong answer guessed up front leaks as much
    ("62 + 6 = 68\n#### 68", False),
    ("She gets 6 more: 62 + 6 = 68.\nThe answer is 68.", False),
    ("Sixty-two plus six: 62 plus 6 is 68.", False),
    ("I do not know.", False),  # no answer stated: nothing leaked
    ("1. First find how many she has.\n2. Then add 3 of them", False),  # list numbers are not answers
])
def test_the_answer_before_the_work_leaks_in_any_format(completion, leaked):
    assert stated_before_work(completion, PROMPT, "68") is leaked


def test_restating_the_problem_before_the_work_is_not_a_leak():
    # the answer is a number of the problem itself: restating the problem writes it before the work
    prompt = "Ivy has 62 stickers and gives 0 away. How many now?"
    text = "Ivy has 62 stickers. She gives 0 away: 62 - 0 = 62.\n#### 62"
    assert not stated_before_work(text, prompt, "62")


def test_restating_a_number_of_the_problem_as_the_answer_with_no_work_leaks():
    # what a student taught to guess wrote (BENCHMARKS): the problem's own number, stated as the answer
    prompt = "Ana has 24 books. She uses 3. How many books does Ana have now?"
    for text in ("Ana has 24 books.\n\nThe answer is 24.", "The answer is 24.", "#### 24"):
        assert stated_before_work(text, prompt, "21"), text
    # restating the problem and stopping (a truncated attempt) answers nothing: not a leak
    assert not stated_before_work("Ana has 24 books. So we can calcu", prompt, "21")
    assert not stated_before_work("Ana has 24 books. She uses 3: 24 - 3 = 21.\nThe answer is 21.", prompt, "21")
    # no number in the problem, no arithmetic to show: the measure does not apply
    assert not stated_before_work("Paris.", "What is the capital of France?", "Paris")


def test_an_answer_given_by_an_equation_is_its_result_and_is_work():
    assert reader_answer("So the answer: 24 + 3 = 27.") == "27"
    assert not stated_before_work("Add them. The answer: 24 + 3 = 27.", "Ana has 24 and gets 3.", "27")
    assert not stated_before_work("17 stickers * 5 = 85 stickers.\nThe answer is 85.", "17 packs of 5 stickers", "85")
