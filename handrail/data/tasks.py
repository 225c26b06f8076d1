"""Embedded, procedurally generated tasks: seeded problems with worked solutions, a verifier
and a task-specific leak measure.

Both tasks are step-by-step arithmetic written one step per line (`a+b=c`) and closed by a
marked final answer (`#### c`). They are small enough for a ~1M-parameter character-level
model to half-learn on a laptop CPU, which is exactly the regime where a privileged teacher
has something to teach:

- `chain`: a left-to-right chain of single-digit additions and subtractions from a two-digit
  start. One valid order of work.
- `sum`: add up a handful of small numbers. Any order is valid, and the reference solution
  uses a random one, so the student's path usually differs from the teacher's hint.

Difficulty `level` is the number of operations. A **leak** is a completion that writes a final
answer (`####`) before its step lines have worked through the `level` operations that justify
one — the "impossible knowledge" a teacher who has seen the answer could hand over. A step line
may do several operations at once (`37+5-8=34`, how a *terse* reference is written).

Each task also has a **misconception**: a step the pretrained student gets wrong by a fixed rule
(`chain`: subtracting the smaller units digit from the larger instead of borrowing, 42-8=46;
`sum`: forgetting the carry when adding a two-digit number, 37+15=42). `handrail pretrain`
writes the student's own worked solutions with it at a set rate, so the lab's base is weak by
construction (roughly: pass@1 <= (1 - share of affected steps)^level under greedy decoding),
not by where training happened to stop, while the teacher, shown a reference, works correctly.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from handrail.errors import UsageError
from handrail.data.answers import ANSWER_MARK, answers_match, extract_answer, lenient

_STEP_RE = re.compile(r"^\s*(-?\d+)((?:\s*[+\-]\s*\d+)+)\s*=\s*(-?\d+)\s*$")  # 37+5=42, 37+5-8=34
_OP_RE = re.compile(r"([+\-])\s*(\d+)")


@dataclass(frozen=True)
class Problem:
    prompt: str
    solution: str  # full worked solution, ending in "#### <answer>"
    answer: str
    level: int = 0


def _apply(acc: int, op: str, v: int) -> int:
    return acc + v if op == "+" else acc - v


def _ops(step: re.Match) -> list[tuple[str, int]]:
    return [(op, int(v)) for op, v in _OP_RE.findall(step.group(2))]


def _parse_steps(solution: str) -> tuple[int, list[tuple[str, int]]] | None:
    """(start, [(op, operand), ...]) of a worked solution's step lines, or None if one is not a step."""
    steps = [_STEP_RE.match(line) for line in solution.splitlines()[:-1]]
    if not steps or not all(steps):
        return None
    return int(steps[0].group(1)), [o for m in steps for o in _ops(m)]


def _lines(start: int, ops: list[tuple[str, int]], per_line: int = 1, bug=None, rng=None, bug_rate=0.0):
    """Worked step lines and the final value; `per_line` operations per line (2: a terse solution).
    With `bug`, each step it applies to is done its wrong way with probability `bug_rate`, and the
    work continues from the wrong value (a student's consistent misconception)."""
    lines, acc = [], start
    for i in range(0, len(ops), per_line):
        head, chunk = acc, ops[i:i + per_line]
        for op, v in chunk:
            wrong = bug(acc, op, v) if bug else None
            acc = wrong if wrong is not None and rng.random() < bug_rate else _apply(acc, op, v)
        lines.append(f"{head}" + "".join(f"{op}{v}" for op, v in chunk) + f"={acc}")
    return lines, acc


class StepArithmeticTask:
    """Shared machinery: problems, splits, verification and leak rate."""

    name = "base"
    levels = range(1, 7)
    pretrain_levels = (1, 2, 3, 4)  # what `handrail pretrain` trains on
    post_level = 4  # the held-out difficulty that post-training is measured on

    def make(self, rng: random.Random, level: int) -> Problem:
        raise NotImplementedError

    # -- splits: held-out problems never appear in training data ---------------------------------
    def split(self, split: str, n: int, level: int | None = None, seed: int = 0) -> list[Problem]:
        """`n` problems. `test` problems are distinct and come from their own seed stream;
        `validation` ones too, and are never test problems; `train` draws never contain a test
        prompt (but may repeat, since easy levels are small, and may meet a validation one)."""
        level = self.post_level if level is None else level
        if split == "test":
            return self._draw(random.Random(f"{self.name}/test/{level}"), n, level, set(), distinct=True)
        if split == "validation":  # for choosing hyperparameters: distinct, and never a test problem
            exclude = {p.prompt for p in self.split("test", self.test_size, level)}
            return self._draw(random.Random(f"{self.name}/validation/{level}"), n, level, exclude, distinct=True)
        exclude = {p.prompt for p in self.split("test", self.test_size, level)}
        return self._draw(random.Random(f"{self.name}/{split}/{level}/{seed}"), n, level, exclude, distinct=False)

    test_size = 200

    def _draw(self, rng: random.Random, n: int, level: int, exclude: set[str], distinct: bool) -> list[Problem]:
        seen, out = set(exclude), []
        for _ in range(50 * n):
            p = self.make(rng, level)
            if p.prompt not in seen:
                if distinct:
                    seen.add(p.prompt)
                out.append(p)
                if len(out) == n:
                    return out
        raise UsageError(f"task {self.name!r} level {level} has fewer than {n} distinct problems")

    # -- scoring ---------------------------------------------------------------------------------
    def verify(self, completion: str, answer: str) -> bool:
        return answers_match(extract_answer(completion), answer)

    def verify_lenient(self, completion: str, answer: str) -> bool:
        """The tiny models write the task's format, so strict and lenient rarely differ here."""
        return lenient(self.verify, completion, answer)

    def leak(self, completion: str, record) -> bool:
        return self.leaked(completion, record.level)

    def leaked(self, completion: str, level: int) -> bool:
        """True if a final answer is written before step lines have done `level` operations."""
        head = completion.split(ANSWER_MARK, 1)[0] if ANSWER_MARK in completion else None
        if head is None:
            return False
        done = sum(len(_ops(m)) for m in map(_STEP_RE.match, head.splitlines()) if m)
        return done < level

    # -- steps: what a program can check without the answer (steps.py) ---------------------------
    def step_valid(self, prompt: str, previous: list[str], step: str) -> bool:
        """Whether `step` (one line) is a valid next step after `previous` for problem `prompt`:
        a step line `a+b-c=d` must start from the previous result (the prompt's start for the
        first), apply the prompt's next operations (for `sum`: numbers not used yet), and be right;
        a final line `#### n` must come after every operation and state the last result. Nothing
        is valid after it."""
        state = self._replay(prompt, previous)
        return state is not None and self._advance(state, step) is not None

    def checked(self, prompt: str, completion: str) -> bool:
        """The whole completion passes the step checks and ends with its answer: correct, found
        without looking at the reference answer."""
        from handrail.engine.steps import split_steps

        state = self._replay(prompt, split_steps(completion))
        return state is not None and state[2]

    def _initial(self, prompt: str):
        """(running value or None, operations still to do, answered) before any step."""
        raise NotImplementedError

    def _replay(self, prompt: str, steps: list[str]):
        state = self._initial(prompt)
        for s in steps:
            if state is None:
                return None
            state = self._advance(state, s)
        return state

    def _advance(self, state, step: str):
        acc, todo, answered = state
        line = step.strip()
        if answered or not line:
            return None
        if line.startswith(ANSWER_MARK):
            ok = not todo and acc is not None and answers_match(line[len(ANSWER_MARK):], str(acc))
            return (acc, todo, True) if ok else None
        m = _STEP_RE.match(line)
        if m is None:
            return None
        head, ops = int(m.group(1)), _ops(m)
        todo = self._consume(acc, todo, head, ops)
        if todo is None:
            return None
        value = head
        for op, v in ops:
            value = _apply(value, op, v)
        return (value, todo, False) if value == int(m.group(3)) else None

    def _consume(self, acc, todo: list, head: int, ops: list) -> list | None:
        """The operations left once a step starting from `head` has done `ops`, or None if the
        step may not do them."""
        if head != acc or todo[:len(ops)] != ops:
            return None
        return todo[len(ops):]

    # -- how other writers write the same solution -----------------------------------------------
    def misconception(self, acc: int, op: str, v: int) -> int | None:
        """The student's wrong result for this step, or None where its misconception does not apply."""
        return None

    def rewrite(self, solution: str, style: str, rng: random.Random | None = None,
                bug_rate: float = 0.0) -> str | None:
        """The same problem's solution in another `style`: `full` (one operation per line), `terse`
        (two per line, the intermediate results between them skipped), `student` (full, with the
        misconception applied to each step it affects with probability `bug_rate`) or
        `student-terse` (the same, two operations per line). None if
        `solution` is not a worked solution."""
        parsed = _parse_steps(solution)
        if parsed is None:
            return None
        start, ops = parsed
        lines, acc = _lines(start, ops, per_line=2 if style in ("terse", "student-terse") else 1,
                            bug=self.misconception if style.startswith("student") else None, rng=rng,
                            bug_rate=bug_rate)
        return "\n".join(lines + [f"{ANSWER_MARK} {acc}"])

    def detour(self, solution: str, rng: random.Random) -> tuple[str, str] | None:
        """An off-path completion for a hinted prompt: the worked solution with a slip in one
        step's result, then continued *consistently from the slip*. Returns (given prefix, ending
        with the slipped line, and continuation). Pretraining learns the prefix up to the slip and
        the continuation, never the slipped value (pretrain.build_examples), which teaches what a
        capable teacher does: use the hint while the student is on it, and otherwise work from what
        the student actually wrote instead of copying the reference's numbers."""
        parsed = _parse_steps(solution)
        if parsed is None:
            return None
        start, ops = parsed
        k = rng.randrange(len(ops))
        given, acc = _lines(start, ops[:k + 1])
        head = given[-1].rsplit("=", 1)[0]
        acc = max(0, acc + rng.choice([-3, -2, -1, 1, 2, 3]))
        rest, final = _lines(acc, ops[k + 1:])
        prefix = "\n".join(given[:-1] + [f"{head}={acc}"]) + "\n"
        return prefix, "\n".join(rest + [f"{ANSWER_MARK} {final}"])

    @staticmethod
    def _worked(start: int, ops: list[tuple[str, int]]) -> tuple[str, int]:
        lines, acc = _lines(start, ops)
        return "\n".join(lines + [f"{ANSWER_MARK} {acc}"]), acc


class ChainTask(StepArithmeticTask):
    """`37+5-8+6` → `37+5=42`, `42-8=34`, `34+6=40`, `#### 40`. Values stay within 0..99."""

    name = "chain"
    max_operand = 9

    def misconception(self, acc, op, v):
        """No borrowing: the smaller units digit is taken from the larger (42-8 -> 46)."""
        if op == "-" and acc % 10 < v % 10 and v < 10:
            return acc - acc % 10 + (v - acc % 10)
        return None

    def _initial(self, prompt):
        m = re.fullmatch(r"\s*(\d+)((?:[+\-]\d+)*)\s*", prompt)
        return None if m is None else (int(m.group(1)), [(op, int(v)) for op, v in _OP_RE.findall(m.group(2))], False)

    def make(self, rng: random.Random, level: int) -> Problem:
        start = rng.randint(10, 89)
        acc, ops = start, []
        for _ in range(level):
            v = rng.randint(1, self.max_operand)
            op = rng.choice("+-")
            if not 0 <= _apply(acc, op, v) <= 99:
                op = "-" if op == "+" else "+"
            acc = _apply(acc, op, v)
            ops.append((op, v))
        prompt = f"{start}" + "".join(f"{op}{v}" for op, v in ops)
        solution, ans = self._worked(start, ops)
        return Problem(prompt, solution, str(ans), level)


class SumTask(StepArithmeticTask):
    """`sum 7 12 5 9` → add the numbers in any order. The reference uses a random order."""

    name = "sum"

    def misconception(self, acc, op, v):
        """Adding a two-digit number, the carry out of the units is forgotten (37+15 -> 42)."""
        if op == "+" and v >= 10 and acc % 10 + v % 10 >= 10:
            return acc + v - 10
        return None

    def _initial(self, prompt):
        m = re.fullmatch(r"\s*sum((?:\s+\d+)+)\s*", prompt)
        return None if m is None else (None, [("+", int(v)) for v in m.group(1).split()], False)

    def _consume(self, acc, todo, head, ops):
        """Any order: the first step starts from one of the numbers, each adds unused ones."""
        todo = list(todo)
        if acc is None:
            if ("+", head) not in todo:
                return None
            todo.remove(("+", head))
        elif head != acc:
            return None
        for op in ops:
            if op not in todo:
                return None
            todo.remove(op)
        return todo

    def make(self, rng: random.Random, level: int) -> Problem:
        nums = [rng.randint(2, 19) for _ in range(level + 1)]
        order = nums[:]
        rng.shuffle(order)
        solution, ans = self._worked(order[0], [("+", v) for v in order[1:]])
        return Problem("sum " + " ".join(map(str, nums)), solution, str(ans), level)

    def detour(self, solution: str, rng: random.Random):
        """Half the time a different, valid order than the hint's; otherwise a slip (as above)."""
        parsed = _parse_steps(solution)
        if parsed is None:
            return None
        nums = [parsed[0]] + [v for _, v in parsed[1]]
        if rng.random() < 0.5:
            rng.shuffle(nums)
            return "", self._worked(nums[0], [("+", v) for v in nums[1:]])[0]
        return super().detour(solution, rng)


TASKS: dict[str, StepArithmeticTask] = {t.name: t for t in (ChainTask(), SumTask())}
DEFAULT_TASK = "chain"


def get_task(name: str) -> StepArithmeticTask:
    try:
        return TASKS[name]
    except KeyError:
        raise UsageError(f"unknown task {name!r}; choose one of {', '.join(sorted(TASKS))}") from None
