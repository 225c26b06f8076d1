"""How a completion is checked against the answer of a record read from a file (embedded tasks
check their own: tasks.py).

`verifier` names one: `exact` (the text after the last `####`, compared as a string or a
number), `math` (the `math-verify` package: LaTeX and expressions, `\\boxed{}` answers,
equivalent forms such as 1/2 and 0.5), or `module:function`, any importable
`function(completion: str, answer: str) -> bool`.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Callable

from handrail.errors import UsageError
from handrail.data.records import reference_answer
from handrail.data.answers import ANSWER_MARK, answers_match, extract_answer, lenient, stated_before_work

Verify = Callable[[str, str], bool]


def exact(completion: str, answer: str) -> bool:
    return answers_match(extract_answer(completion), answer)


def math(completion: str, answer: str) -> bool:
    from math_verify import parse, verify

    gold = parse(answer if "$" in answer or "\\boxed" in answer else f"${answer}$")
    # a completion in the lab's own style ends '#### 42': read that answer, not some earlier number
    marked = extract_answer(completion)
    pred = parse(f"${marked}$") if marked else parse(completion)
    return bool(gold) and bool(pred) and bool(verify(gold, pred))


BUILTIN = {"exact": exact, "math": math}


def load(spec: str) -> Verify:
    """The verifier `spec` names; a ValueError naming config key 'verifier' otherwise."""
    if spec in BUILTIN:
        if spec == "math":
            if importlib.util.find_spec("math_verify") is None:
                raise UsageError("config key 'verifier': math needs the math-verify package "
                                 "(pip install 'handrail[math]')")
        return BUILTIN[spec]
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise UsageError(f"config key 'verifier': expected exact, math or module:function, got {spec!r}")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise UsageError(f"config key 'verifier': cannot load {spec!r} ({type(e).__name__}: {e})") from None
    if not callable(fn):
        raise UsageError(f"config key 'verifier': {spec!r} is not a function")
    return fn


class FileTask:
    """What a task gives the loop for records from a file: the chosen verifier (strict), the same
    verifier on the answer a reader finds (lenient; a custom verifier is its own judge, so there
    both are the same), and the free-text leak (answers.stated_before_work)."""

    def __init__(self, verifier: str = "exact"):
        self.verifier = verifier
        self._verify = load(verifier)

    def verify(self, completion: str, answer: str) -> bool:
        try:
            return bool(self._verify(completion, answer))
        except Exception:  # a checker that fails on odd model output has not accepted it
            if self.verifier in BUILTIN:
                return False
            raise

    def verify_lenient(self, completion: str, answer: str) -> bool:
        if self.verifier not in BUILTIN:
            return self.verify(completion, answer)
        return lenient(self.verify, completion, answer)

    def step_valid(self, prompt, previous: list[str], step: str) -> bool:
        """Form only (no program knows a file task's arithmetic): a non-empty step, and nothing
        after a final-answer line."""
        return bool(step.strip()) and not any(ANSWER_MARK in s for s in previous)

    checked = None  # no whole-completion check without the answer: search needs value=answer

    def leak(self, completion: str, record) -> bool:
        """The final answer (the completion's own, or the reference's) written before any work."""
        return stated_before_work(completion, record.text, reference_answer(record))
