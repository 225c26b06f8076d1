"""Curricula: how a reward changes over a run. `brevity` is "solve it, then shorten it" (seed 003):
the outcome reward alone until validation accuracy stops rising, then a length pressure that
grows slowly, stops growing while accuracy holds at its best less `margin`, and backs off when
accuracy falls below that.

The pressure only ever lowers the reward of a *correct* completion (1 - alpha * tokens / budget),
so a short wrong answer is never worth more than a long right one: shortening cannot teach
guessing.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class Brevity:
    step: float = 0.05  # alpha added per validation check once accuracy has stopped rising
    max_alpha: float = 0.5  # the most a correct completion's reward is lowered for using the whole budget
    margin: float = 0.02  # validation accuracy may fall this far below its best before alpha backs off
    patience: int = 1  # checks without a new best before shortening starts
    alpha: float = 0.0
    best: float = -1.0
    stale: int = 0
    shortening: bool = False

    def update(self, accuracy: float) -> None:
        """One validation check: returns nothing, moves alpha."""
        if not self.shortening:
            if accuracy > self.best + 1e-9:
                self.best, self.stale = accuracy, 0
            else:
                self.stale += 1
            self.shortening = self.stale >= self.patience
            if not self.shortening:
                return
        if accuracy < self.best - self.margin - 1e-9:
            self.alpha = max(0.0, self.alpha - self.step)  # shortening costs accuracy: ease off
        else:
            self.alpha = min(self.max_alpha, self.alpha + self.step)
            self.best = max(self.best, accuracy)

    def reward(self, correct: bool, tokens: int, budget: int) -> float:
        return float(correct) * (1.0 - self.alpha * min(tokens, budget) / budget) if correct else 0.0

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)


def make(cfg) -> Brevity | None:
    if cfg.curriculum == "none":
        return None
    return Brevity(step=cfg.brevity_step, max_alpha=cfg.brevity_max, margin=cfg.brevity_margin,
                   patience=cfg.brevity_patience)
