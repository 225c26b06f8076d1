"""Expert iteration: search for a solution, then distil what the search chose."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from handrail.engine.objectives import chunked_sum, cross_entropy_chunk
from handrail.engine.rollout import Rollout, token_rollout
from handrail.errors import UsageError
from handrail.methods.base import Method, Options, TokenSignal, World


class ExpertIteration(Method, name="expert-iteration"):
    """The AlphaZero loop with steps as moves (search.py): each prompt is searched with the current
    policy (step-level pUCT, `search_simulations` per move, `search_candidates` per expansion),
    and the policy is trained by cross-entropy towards each move's visit distribution over its
    candidate steps (each step's tokens weighted by its share of the visits), plus the rest of a
    completion that passed the check, if the search found one. Values: the task's program check
    where there is one, else the reference answer (training data, so no oracle here). Every
    sequence the search samples, candidate step or rollout, counts as one rollout in the budget,
    which is conservative: a candidate step is a fraction of a completion."""

    needs_rollouts = False  # it samples inside the search
    needs_solutions = False  # values come from the check or the answer
    one_per_prompt = True
    cost_varies = True

    @dataclass
    class Options(Options):
        search_simulations: int = 2  # pUCT simulations per move
        search_candidates: int = 4  # next steps sampled per expansion
        search_value: str = ""  # check (the task's program check) | answer (the reference) | "" (check where the task has one)

        RANGES = {"search_simulations": "[1, )", "search_candidates": "[1, )"}
        CHOICES = {"search_value": ("", "check", "answer")}

    @classmethod
    def check(cls, cfg) -> None:
        super().check(cfg)
        if cfg.search_value == "check" and cfg.data:
            raise UsageError("config key 'search_value': check needs a task with a program check (the embedded "
                             "tasks); with --data use answer")

    def given_rollout(self, records, device, lm=None) -> Rollout:
        from handrail.methods.search import Problem, SearchConfig, Searcher, value_mode

        cfg = self.cfg
        searcher = Searcher(lm, self.tokenizer, self.templates, self.task, SearchConfig(
            simulations=cfg.search_simulations, candidates=cfg.search_candidates,
            value=value_mode(self.task, cfg.search_value),
            max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, delimiter=cfg.step_delimiter))
        with torch.no_grad():
            problems = searcher.search([Problem(r, ids) for r, ids in
                                        zip(records, self.prompts(records))])
        self.spent = searcher.sequences
        rows = []  # (prompt ids, completion ids, weight)
        for p in problems:
            for root, children in p.moves:
                total = sum(v for _, v in children)
                rows += [(p.prompt + root, tokens[len(root):], v / total) for tokens, v in children]
            if p.solution_tokens is not None:  # found and checked: the rest of it, from where the moves stopped
                rows.append((p.prompt + p.root.tokens, p.solution_tokens[len(p.root.tokens):], 1.0))
        rows = [r for r in rows if r[1]] or [(problems[0].prompt, [self.tokenizer.pad_token_id], 0.0)]
        prompts, comps, weights = zip(*rows)
        rollout = token_rollout(list(prompts), list(comps), self.tokenizer.pad_token_id,
                                self.tokenizer.batch_decode(comps, skip_special_tokens=True), device)
        rollout.weights = torch.tensor(weights, device=device)[:, None]  # each row's share of the visits
        rollout.completion_mask *= (rollout.weights > 0).float()  # the stand-in row of a step that found nothing
        return rollout

    def score(self, records, rollout, lm_now, world: World):
        return TokenSignal(rollout.weights)

    def loss(self, head, hidden, rollout, signal):
        loss, nll = chunked_sum(cross_entropy_chunk, hidden, head, rollout.completion_ids,
                                rollout.completion_mask * signal.weight, chunk_size=self.cfg.chunk_size)
        return loss, {"loss/nll": nll}

    def step_metrics(self, signal):
        return {"search/rows": int(signal.weight.numel()), "search/sequences": self.spent}


# Values that switch an option off: any method may carry them (a resolved counterfactual=auto is
# "none" in every run's config.json, whatever its method).
