"""`handrail search`: step-level pUCT search at test time (AlphaZero's selection, with steps as
actions), and best-of-N sampling at the same accounting to compare it with.

A node is a completion prefix that ends at a step boundary (steps.py). Expanding a node samples
`candidates` next steps from the model (each stops at the step delimiter or a stop token),
drops duplicates and steps the task says are invalid, and gives each kept step the model's
probability of it, renormalised over the kept ones, as its prior. A simulation walks from the
root by pUCT (`puct_index`) to a leaf, expands it, rolls its most likely child out to the end,
and backs the rollout's value up the path. After `simulations` simulations the most visited
child becomes the new root (one move); moves repeat until a terminal step.

Values: `check` scores a finished completion by the task's own program check (every step valid,
the final answer stated; the embedded tasks' `checked`), which needs no reference answer, so
it is fair at test time; a completion that passes it is a solution and ends that problem's
search. `answer` scores it with the verifier against the reference answer: the only choice for
data files, and an oracle at test time (an upper bound, labelled as such), legitimate only
where references are training data.

Every generated token counts (`tokens`): expansions, rollouts, and for best-of-N every sample;
best-of-N stops a problem at its first sample that passes the check, as search does.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import torch

from handrail.errors import UsageError
from handrail.data.records import Record, reference_answer
from handrail.runtime.evaluate import is_correct, prompt_ids
from handrail.runtime.models import stop_ids
from handrail.engine.rollout import sample
from handrail.engine.steps import DEFAULT_DELIMITER, delimiter_ids, split_steps
from handrail.data.answers import extract_answer


def puct_index(priors: list[float], visits: list[int], values: list[float], c_puct: float) -> int:
    """The child maximising Q + c * P * sqrt(N_parent + 1) / (1 + N): Q is the child's mean value
    (0 if unvisited), P its prior. The +1 lets the priors order the children before any visit.
    Ties go to the first (children are kept in descending prior)."""
    total = sum(visits)
    scores = [(v / n if n else 0.0) + c_puct * p * math.sqrt(total + 1) / (1 + n)
              for p, n, v in zip(priors, visits, values)]
    return max(range(len(scores)), key=lambda i: scores[i])


def priors_from_logps(logps: list[float]) -> list[float]:
    """Sequence log-probs of the kept candidates -> priors that sum to 1."""
    top = max(logps)
    w = [math.exp(lp - top) for lp in logps]
    return [x / sum(w) for x in w]


@dataclass
class Node:
    tokens: list[int]  # completion tokens from the problem's prompt to here
    prior: float = 1.0
    visits: int = 0
    value_sum: float = 0.0
    children: list["Node"] | None = None  # None until expanded
    logp: float = 0.0  # the model's log-probability of this node's last step
    terminal: bool = False  # ended by a stop token, the token budget, or no valid next step
    value: float | None = None  # a terminal node's own value

    def open(self) -> bool:
        """To be expanded (again) when a simulation reaches it: never expanded, or every step
        sampled from it so far was invalid or led to a dead end."""
        return not self.terminal and (not self.children or all(c.terminal and not c.value for c in self.children))

    def select(self, c_puct: float) -> "Node":
        return self.children[puct_index([c.prior for c in self.children], [c.visits for c in self.children],
                                         [c.value_sum for c in self.children], c_puct)]


@dataclass
class Problem:
    record: Record
    prompt: list[int]
    root: Node = field(default_factory=lambda: Node([]))
    solution: str | None = None  # a completion that passed the value check (check mode)
    solution_tokens: list[int] | None = None
    tokens: int = 0  # generated, all of them
    moves: list = field(default_factory=list)  # (root's tokens, [(child's tokens, visits)]) for each move made


@dataclass
class SearchConfig:
    simulations: int = 8  # per move
    candidates: int = 4  # next steps sampled per expansion (before duplicates and invalid ones go)
    c_puct: float = 1.0
    value: str = "check"  # check (the task's program check, no answer) | answer (the reference: an oracle at test time)
    max_new_tokens: int = 96
    temperature: float = 1.0
    delimiter: str = DEFAULT_DELIMITER
    batch_size: int = 64  # problems searched in lockstep


def value_mode(task, value: str = "") -> str:
    """The value a search uses: `value`, or by default the task's program check where it has one,
    else the reference answer. Asking for `check` of a task without one is an error."""
    has_check = getattr(task, "checked", None) is not None
    if value == "check" and not has_check:
        raise UsageError("--value: check needs a task with a program check (the embedded tasks); "
                         "for data files use --value answer (an oracle at test time)")
    return value or ("check" if has_check else "answer")


class Searcher:
    def __init__(self, model, tokenizer, templates, task, cfg: SearchConfig):
        value_mode(task, cfg.value)
        self.model, self.tok, self.templates, self.task, self.cfg = model, tokenizer, templates, task, cfg
        self.stops = stop_ids(tokenizer)
        self.sequences = 0  # sampled sequences (candidate steps and rollouts): what training counts as rollouts
        self.step_stops = sorted(set(self.stops) | set(delimiter_ids(tokenizer, cfg.delimiter)))

    # -- pieces ------------------------------------------------------------------------------------
    def text(self, tokens: list[int]) -> str:
        return self.tok.decode(tokens, skip_special_tokens=True)

    def value_of(self, p: Problem, tokens: list[int]) -> float:
        text = self.text(tokens)
        if self.cfg.value == "check":
            return float(self.task.checked(p.record.text, text))
        return float(is_correct(text, p.record, self.task))

    def _sample(self, prefixes: list[list[int]], budget: int, stops: list[int]):
        self.sequences += len(prefixes)
        out = sample(self.model, self.tok, prefixes, max_new_tokens=max(1, budget), stop_ids=stops,
                     temperature=self.cfg.temperature)
        rows = []
        for ids, mask, lps in zip(out.completion_ids.tolist(), out.completion_mask.tolist(), out.logprobs.tolist()):
            n = int(sum(mask))
            rows.append((ids[:n], sum(lps[:n])))
        return rows

    def expand(self, problems: list[Problem], leaves: list[Node]) -> None:
        """Sample next steps for every leaf at once and add the valid ones it does not have yet;
        priors are renormalised over all its children."""
        k, cap = self.cfg.candidates, self.cfg.max_new_tokens
        prefixes = [p.prompt + leaf.tokens for p, leaf in zip(problems, leaves) for _ in range(k)]
        budget = max(cap - len(leaf.tokens) for leaf in leaves)
        rows = self._sample(prefixes, budget, self.step_stops)
        for i, (p, leaf) in enumerate(zip(problems, leaves)):
            room = cap - len(leaf.tokens)
            previous = split_steps(self.text(leaf.tokens), self.cfg.delimiter)
            seen = {tuple(c.tokens[len(leaf.tokens):]) for c in leaf.children or []}
            kept = [(c.logp, c) for c in leaf.children or []]
            for ids, lp in rows[i * k:(i + 1) * k]:
                ids = ids[:room]
                p.tokens += len(ids)
                step = self.text(ids)
                if not ids or tuple(ids) in seen or not self.task.step_valid(p.record.text, previous, step):
                    continue
                seen.add(tuple(ids))
                done = ids[-1] in self.stops or len(leaf.tokens) + len(ids) >= cap
                kept.append((lp, Node(leaf.tokens + ids, terminal=done, logp=lp)))
            kept.sort(key=lambda x: -x[0])
            if kept:
                for child, prior in zip([n for _, n in kept], priors_from_logps([lp for lp, _ in kept])):
                    child.prior = prior
            leaf.children = [n for _, n in kept]  # empty: nothing valid sampled yet; tried again on a later visit

    def simulate(self, problems: list[Problem]) -> None:
        """One simulation for every problem: select, expand, roll out, back up."""
        paths = []
        for p in problems:
            node, path = p.root, [p.root]
            while not node.terminal and not node.open():
                node = node.select(self.cfg.c_puct)
                path.append(node)
            paths.append(path)
        fresh = [(p, path) for p, path in zip(problems, paths) if path[-1].open()]
        leaves = [(p, path) for p, path in zip(problems, paths)]
        if fresh:
            self.expand([p for p, _ in fresh], [path[-1] for _, path in fresh])
            for p, path in fresh:  # evaluate the leaf's most likely child not yet visited
                unvisited = [c for c in path[-1].children if not c.visits]
                if unvisited:
                    path.append(unvisited[0])
                else:  # no new valid step this time: value 0, and it is sampled again on a later visit
                    self._backup(path, 0.0)
                    leaves.remove((p, path))
        open_ = [(p, path) for p, path in leaves if not path[-1].terminal]
        if open_:
            cap = self.cfg.max_new_tokens
            rows = self._sample([p.prompt + path[-1].tokens for p, path in open_],
                                max(cap - len(path[-1].tokens) for _, path in open_), self.stops)
            for (p, path), (ids, _) in zip(open_, rows):
                ids = ids[:cap - len(path[-1].tokens)]
                p.tokens += len(ids)
                full = path[-1].tokens + ids
                v = self.value_of(p, full)
                if v > 0 and self.cfg.value == "check" and p.solution is None:
                    p.solution, p.solution_tokens = self.text(full), full
                self._backup(path, v)
        for p, path in leaves:
            leaf = path[-1]
            if leaf.terminal:
                if leaf.value is None:
                    leaf.value = self.value_of(p, leaf.tokens)
                if leaf.value > 0 and self.cfg.value == "check" and p.solution is None:
                    p.solution, p.solution_tokens = self.text(leaf.tokens), leaf.tokens
                self._backup(path, leaf.value)

    @staticmethod
    def _backup(path: list[Node], v: float) -> None:
        for node in path:
            node.visits += 1
            node.value_sum += v

    # -- the whole search ----------------------------------------------------------------------------
    def search(self, problems: list[Problem]) -> list[Problem]:
        """Search every problem to its end, in lockstep, recording each move's visit counts."""
        active = list(problems)
        while active:
            for _ in range(self.cfg.simulations):
                self.simulate([p for p in active if p.solution is None])
                if all(p.solution is not None for p in active):
                    break
            nxt = []
            for p in active:  # a move: the most visited child becomes the root
                if p.solution is None and p.root.children:
                    p.moves.append((p.root.tokens, [(c.tokens, c.visits) for c in p.root.children if c.visits]))
                    p.root = max(p.root.children, key=lambda c: c.visits)
                    if not p.root.terminal:
                        nxt.append(p)
            active = nxt
        return problems

    def run(self, records: list[Record], progress=None) -> list[dict]:
        out = []
        for start in range(0, len(records), self.cfg.batch_size):
            recs = records[start:start + self.cfg.batch_size]
            problems = self.search([Problem(r, ids) for r, ids in zip(recs, prompt_ids(self.tok, recs, self.templates))])
            for p in problems:
                text = p.solution if p.solution is not None else self.text(p.root.tokens)
                out.append(_result(p.record, text, p.tokens, self.task))
            if progress is not None:
                progress.update(len(recs))
        return out

    def best_of_n(self, records: list[Record], n: int, progress=None) -> list[dict]:
        """Up to `n` independent samples per problem, drawn one round at a time; a problem stops at
        its first sample that passes the value check (check mode). The answer is that sample, else
        the most common final answer among the samples (majority vote), else the first sample."""
        out = []
        for start in range(0, len(records), self.cfg.batch_size):
            recs = records[start:start + self.cfg.batch_size]
            problems = [Problem(r, ids) for r, ids in zip(recs, prompt_ids(self.tok, recs, self.templates))]
            texts: list[list[str]] = [[] for _ in problems]
            for _ in range(n):
                todo = [i for i, p in enumerate(problems) if p.solution is None]
                if not todo:
                    break
                rows = self._sample([problems[i].prompt for i in todo], self.cfg.max_new_tokens, self.stops)
                for i, (ids, _) in zip(todo, rows):
                    p = problems[i]
                    p.tokens += len(ids)
                    texts[i].append(self.text(ids))
                    if self.cfg.value == "check" and self.value_of(p, ids) > 0:
                        p.solution = texts[i][-1]
            for p, ts in zip(problems, texts):
                out.append(_result(p.record, p.solution if p.solution is not None else _majority(ts), p.tokens, self.task))
            if progress is not None:
                progress.update(len(recs))
        return out


def _majority(texts: list[str]) -> str:
    answers = [extract_answer(t) for t in texts]
    counts = Counter(a for a in answers if a)
    if not counts:
        return texts[0]
    best = counts.most_common(1)[0][0]
    return texts[answers.index(best)]


def _result(rec: Record, text: str, tokens: int, task) -> dict:
    return {"prompt": rec.text, "completion": text, "answer": reference_answer(rec),
            "correct": bool(is_correct(text, rec, task)), "tokens": tokens}


def summarize(rows: list[dict], **extra) -> dict:
    n = len(rows)
    return {"accuracy": sum(r["correct"] for r in rows) / n if n else 0.0, "n": n,
            "tokens_per_problem": sum(r["tokens"] for r in rows) / n if n else 0.0, **extra}


@torch.no_grad()
def search(model, tokenizer, templates, records, task, cfg: SearchConfig, best_of: int = 0, seed: int = 0,
           progress=None) -> tuple[dict, list[dict]]:
    """(summary, per-problem rows): pUCT search, or best-of-`best_of` sampling when it is > 0."""
    torch.manual_seed(seed)
    model.eval()
    s = Searcher(model, tokenizer, templates, task, cfg)
    rows = s.best_of_n(records, best_of, progress) if best_of else s.run(records, progress)
    how = {"method": f"best-of-{best_of}"} if best_of else {"method": "search", "simulations": cfg.simulations,
                                                           "candidates": cfg.candidates, "c_puct": cfg.c_puct}
    return summarize(rows, value=cfg.value, **how), rows
