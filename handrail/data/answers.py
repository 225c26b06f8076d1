"""Reading a completion's final answer, defined once for every command.

- **strict**: the answer in the verifier's own format: the text after the last `####` (or what a
  `math` / custom verifier accepts). What a grader that insists on the format counts.
- **lenient**: the final answer where a reader would find it: the last answer a completion marks
  (`#### x`, `\\boxed{x}`, "the answer is x", "answer: x"), else its last number. A small instruct
  model often solves a problem and ignores the requested format; strict scoring then measures
  the format, lenient the problem. Reports give both.
- **leak** (`stated_before_work`): the final answer written before any work that could produce
  it, in free text as much as in `####` form: "The answer is 68. Ivy had 62..." leaks, "62 + 6 =
  68" and "she gets 6 more: 62 + 6 = 68" do not. Work is an arithmetic expression (a number, an
  operator, a number: `62 + 6`, `3 x 4`, `12 plus 30`). A completion leaks if it marks a final
  answer (`####`, `\\boxed{}`, "the answer is") with no work before it ("Ana has 24 books. The
  answer is 24."), or if an answer (its own, or the reference's) is first written before any
  work; an early mention of a number the problem itself states is not counted by the second rule
  (restating the problem is not answering it). A problem with
  no number in it has no arithmetic to show, and the measure does not apply (never a leak).
"""

from __future__ import annotations

import re

ANSWER_MARK = "####"

_NUMBER = re.compile(r"(?<![\w.])-?\d[\d,]*(?:\.\d+)?(?![\d])")
# "the answer is 42", "Answer: 42", "final answer is $42$": what follows, up to the end of its line
_SAYS = re.compile(r"answer\s*(?:is|:|=|would be|will be)\s*[:\-]?\s*([^\n]*)", re.IGNORECASE)
_OPERATOR = re.compile(r"\s*(?:[a-z]+\s*)?[+\-*/×÷x=]")
# a number (perhaps with its unit: "17 stickers * 5"), an operator, a number
_WORK = re.compile(r"\d\s*(?:[a-z]+\s*)?(?:[+\-*/×÷x=]|plus|minus|times|divided by|multiplied by|added to)\s*\(?\$?-?\d",
                   re.IGNORECASE)


def extract_answer(completion: str, mark: str = ANSWER_MARK) -> str | None:
    """The strict answer: the text after the last answer mark, up to the end of that line, or None."""
    if mark not in completion:
        return None
    tail = completion.rsplit(mark, 1)[1].strip()
    return tail.splitlines()[0].strip() if tail else ""


def _as_number(text: str) -> float | None:
    try:
        return float(text.replace(",", "").replace("$", "").strip())
    except ValueError:
        return None


def answers_match(predicted: str | None, reference: str) -> bool:
    if predicted is None:
        return False
    p, r = predicted.strip().rstrip("."), reference.strip().rstrip(".")
    if p == r:
        return True
    pn, rn = _as_number(p), _as_number(r)  # "42", "42.0", "$42" and "1,042" read as numbers
    return pn is not None and pn == rn


def _boxed(text: str) -> list[tuple[int, str]]:
    """(position, contents) of every balanced \\boxed{...}."""
    out, start = [], text.find("\\boxed{")
    while start >= 0:
        i, depth = start + len("\\boxed{"), 1
        for j in range(i, len(text)):
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            if depth == 0:
                out.append((start, text[i:j].strip()))
                break
        start = text.find("\\boxed{", start + 1)
    return out


def last_boxed(text: str) -> str | None:
    """The contents of the last \\boxed{...} in `text`, braces balanced, or None."""
    found = _boxed(text)
    return found[-1][1] if found else None


def _value(text: str, at: int) -> tuple[int, str]:
    """An answer as written after its marker, and where it starts (`at`: where `text` starts in the
    completion): the first number (so "68 stickers." is 68), or where that number starts an
    equation, its result ("62 + 6 = 68" is 68); without a number, the text without markdown and a
    closing full stop."""
    m = _NUMBER.search(text)
    if m and _OPERATOR.match(text, m.end()):  # an equation: its result
        m = _NUMBER.search(text, text.rfind("=") + 1) or m
    if m:
        return at + m.start(), m.group().replace(",", "")
    return at, text.strip().rstrip(".").strip("*$_ ").rstrip(".")


def _stated(completion: str) -> tuple[int, str, bool] | None:
    """(where, what, marked) of the lenient answer: the last marked one (`####`, `\\boxed{}`, "the
    answer is"), else the last number in the text (not marked), else None. `where` is where the
    answer itself is written (after its marker)."""
    marked = [(m.start(), m.start(1), m.group(1)) for m in _SAYS.finditer(completion)]
    marked += [(pos, pos + len("\\boxed{"), text) for pos, text in _boxed(completion)]
    if ANSWER_MARK in completion:
        pos = completion.rfind(ANSWER_MARK)
        rest = completion[pos + len(ANSWER_MARK):]
        marked.append((pos, pos + len(ANSWER_MARK) + len(rest) - len(rest.lstrip()), extract_answer(completion)))
    found = [(pos, *_value(text, at)) for pos, at, text in marked if text and text.strip()]
    found = [f for f in found if f[2]]
    if found:
        _, at, value = max(found)
        return at, value, True
    numbers = list(_NUMBER.finditer(completion))
    return (numbers[-1].start(), numbers[-1].group().replace(",", ""), False) if numbers else None


def reader_answer(completion: str) -> str | None:
    """The lenient answer: the last marked one (`####`, `\\boxed{}`, "the answer is"), else the
    last number in the text, else None."""
    found = _stated(completion)
    return None if found is None else found[1]


def lenient(verify, completion: str, answer: str) -> bool:
    """`verify` (a strict check: completion, answer -> bool) passed, or passes on the answer a
    reader finds (reader_answer) written in the strict format."""
    if verify(completion, answer):
        return True
    found = reader_answer(completion)
    return found is not None and verify(f"{ANSWER_MARK} {found}", answer)


def _first_mention(text: str, answer: str) -> int | None:
    """Where `answer` is first written in `text`: as a number equal in value, or as words."""
    value = _as_number(answer)
    if value is not None:
        return next((m.start() for m in _NUMBER.finditer(text) if _as_number(m.group()) == value), None)
    if not answer.strip():
        return None
    m = re.search(r"(?<!\w)" + re.escape(answer.strip()) + r"(?!\w)", text, re.IGNORECASE)
    return None if m is None else m.start()


def stated_before_work(completion: str, prompt: str, reference: str | None = None) -> bool:
    """True if the completion marks a final answer with no work before it, or if an answer (the
    one it marks, or the `reference`) is first written before any work (see the module
    docstring). For a problem with no number in it there is no arithmetic to show: never a leak.
    An unmarked last number is not taken for a stated answer here (a truncated attempt often ends
    on a number of the problem, restated)."""
    if not _NUMBER.search(prompt):
        return False
    stated = _stated(completion)
    answers = [reference]
    if stated is not None and stated[2]:
        if not _WORK.search(completion[:stated[0]]):
            return True  # "Ana has 24 books. The answer is 24.": an answer, and no work at all before it
        answers.append(stated[1])
    for answer in {a.strip() for a in answers if a and a.strip()}:
        if _first_mention(prompt, answer) is not None:
            continue  # the problem states it: writing it early (restating the problem) proves nothing
        at = _first_mention(completion, answer)
        if at is not None and not _WORK.search(completion[:at]):
            return True
    return False
