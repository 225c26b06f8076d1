"""Steps: a completion as a sequence of actions bigger than a token.

A step is the text up to and including a delimiter (a line break by default), so that branching
rollouts (methods.Vine), step-level search (search.py) and step checks act on units a program can
judge. On token ids a step ends after every token whose text contains the delimiter, and after a
completion's last token; finding those ends is one table lookup per token, no Python loop.

Whether a step is *valid* is the task's call (`step_valid`): the embedded tasks check the line's
form and its arithmetic against the previous step and the prompt's operations
(tasks.StepArithmeticTask.step_valid); data-file tasks check the form only (a non-empty step).
"""

from __future__ import annotations

import weakref

import torch

DEFAULT_DELIMITER = "\n"
# per tokenizer object (not its id, which a later tokenizer may reuse), per delimiter
_TABLES: "weakref.WeakKeyDictionary[object, dict[str, torch.Tensor]]" = weakref.WeakKeyDictionary()


def split_steps(text: str, delimiter: str = DEFAULT_DELIMITER) -> list[str]:
    """The steps of `text`, each keeping its delimiter; the last may lack one. Empty text: none."""
    parts = text.split(delimiter)
    steps = [p + delimiter for p in parts[:-1]]
    return steps + ([parts[-1]] if parts[-1] else [])


def delimiter_table(tokenizer, delimiter: str = DEFAULT_DELIMITER) -> torch.Tensor:
    """(V,) bool: tokens whose text contains `delimiter` (computed once per tokenizer)."""
    tables = _TABLES.setdefault(tokenizer, {})
    if delimiter not in tables:
        texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
        tables[delimiter] = torch.tensor([delimiter in t for t in texts], dtype=torch.bool)
    return tables[delimiter]


def delimiter_ids(tokenizer, delimiter: str = DEFAULT_DELIMITER) -> list[int]:
    return delimiter_table(tokenizer, delimiter).nonzero().flatten().tolist()


def step_ends(completion_ids: torch.Tensor, mask: torch.Tensor, table: torch.Tensor) -> list[list[int]]:
    """For each row, the token positions (exclusive) where its steps end: after each delimiter
    token and at the completion's length; sorted, without duplicates."""
    is_end = table.to(completion_ids.device)[completion_ids] & (mask > 0)
    lengths = mask.sum(1).long().tolist()
    rows = [[] for _ in lengths]
    for r, t in is_end.nonzero().tolist():
        rows[r].append(t + 1)
    return [sorted(set(e + ([n] if n else []))) for e, n in zip(rows, lengths)]
