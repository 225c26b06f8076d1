"""What a run may spend and what each step costs, in samples, in one place.

A run is given `rollouts` samples. A sampling step costs `rollouts_per_step` (prompts x samples
per prompt, and for vine every continuation too); a method whose cost is known only once the step
has run (expert iteration's search) reports what it spent; the bootstrap stage's rollouts, drawn
before step 1, come out of the same budget. Methods that sample nothing (SFT on references,
logged conversations) are charged as if each example were a rollout, so that methods compare at
equal samples: `samples()` is the figure every metrics row carries and `compare` plots.
"""

from __future__ import annotations


class Budget:
    def __init__(self, total: int, per_step: int, sampling: bool):
        self.total, self.per_step, self.sampling = total, per_step, sampling

    @classmethod
    def of(cls, cfg, method) -> "Budget":
        return cls(cfg.rollouts, cfg.rollouts_per_step, method.needs_rollouts and cfg.rollout != "logged")

    def steps(self, state) -> int:
        """Training steps the budget buys once the bootstrap stage has spent its share."""
        return (self.total - state.bootstrap_rollouts) // self.per_step

    def left(self, state) -> bool:
        return state.step < self.steps(state) and not (state.step and state.rollouts >= self.total)

    def spend(self, state, spent: int | None) -> None:
        """Charge the step just taken: `spent` (summed over processes) where the method counts its
        own, otherwise a sampling step's fixed cost."""
        if spent is not None:
            state.rollouts += spent
        elif self.sampling:
            state.rollouts += self.per_step

    def samples(self, state) -> int:
        """Samples consumed so far: rollouts drawn, or for a step that samples nothing as many
        examples as it read."""
        return max(state.rollouts, state.step * self.per_step + state.bootstrap_rollouts)
