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
answer (`####`) before it has written the `level` step lines that justify one — the
"impossible knowledge" a teacher who has seen the answer could hand over.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

ANSWER_MARK = "####"
_STEP_RE = re.compile(r"^\s*(-?\d+)\s*([+\-])\s*(-?\d+)\s*=\s*(-?\d+)\s*$")


@dataclass(frozen=True)
class Problem:
    prompt: str
    solution: str  # full worked solution, ending in "#### <answer>"
    answer: str
    level: int = 0


def extract_answer(completion: str, mark: str = ANSWER_MARK) -> str | None:
    """The text after the last answer mark, up to the end of that line, or None."""
    if mark not in completion:
        return None
    tail = completion.rsplit(mark, 1)[1].strip()
    return tail.splitlines()[0].strip() if tail else ""


def answers_match(predicted: str | None, reference: str) -> bool:
    if predicted is None:
        return False
    p, r = predicted.strip().rstrip("."), reference.strip().rstrip(".")
    if p == r:
        return True
    try:  # "42", "42.0" and " 42" are the same number
        return float(p.replace(",", "")) == float(r.replace(",", ""))
    except ValueError:
        return False


def _apply(acc: int, op: str, v: int) -> int:
    return acc + v if op == "+" else acc - v


def _parse_steps(solution: str) -> tuple[int, list[tuple[str, int]]] | None:
    """(start, [(op, operand), ...]) of a worked solution's step lines, or None if one is not a step."""
    steps = [_STEP_RE.match(line) for line in solution.splitlines()[:-1]]
    if not steps or not all(steps):
        return None
    return int(steps[0].group(1)), [(m.group(2), int(m.group(3))) for m in steps]


def answer_only_hint(answer: str) -> str:
    return f"{ANSWER_MARK} {answer}"


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
        """`n` problems. `test` problems are distinct and come from their own seed stream; `train`
        draws never contain a test prompt (but may repeat, since easy levels are small)."""
        level = self.post_level if level is None else level
        if split == "test":
            return self._draw(random.Random(f"{self.name}/test/{level}"), n, level, set(), distinct=True)
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
        raise ValueError(f"task {self.name!r} level {level} has fewer than {n} distinct problems")

    # -- scoring ---------------------------------------------------------------------------------
    def verify(self, completion: str, answer: str) -> bool:
        return answers_match(extract_answer(completion), answer)

    def leaked(self, completion: str, level: int) -> bool:
        """True if a final answer is written before `level` step lines are."""
        head = completion.split(ANSWER_MARK, 1)[0] if ANSWER_MARK in completion else None
        if head is None:
            return False
        steps = sum(1 for line in head.splitlines() if _STEP_RE.match(line))
        return steps < level

    def detour(self, solution: str, rng: random.Random) -> tuple[str, str] | None:
        """An off-path completion for a hinted prompt: the worked solution with a slip in one
        step's result, then continued *consistently from the slip*. Returns (given prefix,
        continuation). Pretraining on the continuation only teaches the teacher what a capable
        teacher does: use the hint while the student is on it, and otherwise work from what the
        student actually wrote instead of copying the reference's numbers."""
        parsed = _parse_steps(solution)
        if parsed is None:
            return None
        acc, ops = parsed
        k = rng.randrange(len(ops))
        lines = []
        for i, (op, v) in enumerate(ops):
            new = _apply(acc, op, v)
            if i == k:
                new = max(0, new + rng.choice([-3, -2, -1, 1, 2, 3]))
            lines.append(f"{acc}{op}{v}={new}")
            acc = new
        prefix = "\n".join(lines[:k + 1]) + "\n"
        return prefix, "\n".join(lines[k + 1:] + [f"{ANSWER_MARK} {acc}"])

    @staticmethod
    def _worked(start: int, ops: list[tuple[str, int]]) -> tuple[str, int]:
        lines, acc = [], start
        for op, v in ops:
            new = _apply(acc, op, v)
            lines.append(f"{acc}{op}{v}={new}")
            acc = new
        lines.append(f"{ANSWER_MARK} {acc}")
        return "\n".join(lines), acc


class ChainTask(StepArithmeticTask):
    """`37+5-8+6` → `37+5=42`, `42-8=34`, `34+6=40`, `#### 40`. Values stay within 0..99."""

    name = "chain"
    max_operand = 9

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
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(sorted(TASKS))}") from None
