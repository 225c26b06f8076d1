"""Batched, KV-cached sampling from a causal LM.

Prompts are left-padded so every row's completion starts in the same column; the cache grows
one column per step, and finished rows keep feeding padding until the whole batch is done.

Sampling noise is drawn per *global* row from a generator seeded by (seed, step): a row gets the
same noise whether it is sampled alone, in a big batch, or on another process, which is what
makes multi-process training reproduce single-process training.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import decoder
from .decoder import LeanDecoder, positions, supported


@dataclass
class Rollout:
    prompt_ids: list[list[int]]  # unpadded prompt of each row
    completion_ids: torch.Tensor  # (B, T) right-padded; includes the stop token
    completion_mask: torch.Tensor  # (B, T) 1.0 on sampled tokens, 0.0 on padding
    logprobs: torch.Tensor  # (B, T) log-prob of each sampled token under the sampling distribution
    texts: list[str]  # decoded completions, special tokens dropped
    step_ends: list[list[int]] | None = None  # token positions (exclusive) where each row's steps end (steps.py)
    weights: torch.Tensor | None = None  # (B, 1) a weight per row, for text a method chose itself (expert iteration)

    @property
    def n_tokens(self) -> int:
        return int(self.completion_mask.sum())


def left_pad(seqs: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention_mask), both (B, max_len), padded on the left."""
    width = max(len(s) for s in seqs)
    # one tensor from padded lists, not a copy per row (three of these a step)
    ids = torch.tensor([[pad_id] * (width - len(s)) + list(s) for s in seqs], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], dtype=torch.long)
    return ids.to(device), mask.to(device)


def top_p_filter(logits_B_V: torch.Tensor, top_p: float) -> torch.Tensor:
    """Set logits outside the smallest set of tokens with cumulative probability >= top_p to -inf."""
    if top_p >= 1.0:
        return logits_B_V
    sorted_logits, order = logits_B_V.sort(dim=-1, descending=True)
    cum = sorted_logits.softmax(-1).cumsum(-1)
    drop_sorted = (cum - sorted_logits.softmax(-1)) >= top_p  # mass before this token already enough
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits_B_V.masked_fill(drop, float("-inf"))


def gumbel_noise(shape: tuple[int, int], seed: int, step: int, rows: slice, device) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    u = torch.rand(shape, generator=g)[rows].clamp_(1e-20, 1.0)
    return u.log_().neg_().log_().neg_().to(device)  # -log(-log u), in place


def choose(logits_B_V: torch.Tensor, temperature: float, top_p: float, noise_B_V: torch.Tensor | None):
    """Pick next tokens. Returns (tokens (B,), logprob of each under the temperature-scaled policy)."""
    logits = logits_B_V.float()
    if temperature <= 0:
        tok = logits.argmax(-1)
        logp = F.log_softmax(logits, -1)
    else:
        logp = F.log_softmax(logits / temperature if temperature != 1.0 else logits, -1)
        filtered = top_p_filter(logp, top_p)
        noise = noise_B_V if noise_B_V is not None else -torch.empty_like(filtered).exponential_().log()
        tok = (filtered + noise).argmax(-1)
    return tok, logp.gather(-1, tok[:, None]).squeeze(-1)


@dataclass
class Guide:
    """Guided decoding (docs/method.md §3): a second model pass on the teacher's prompt, whose
    distribution is aggregated with the student's by `rule` at every step before sampling."""

    model: object  # the teacher (often the same weights as the student)
    prompt_ids: list[list[int]]  # teacher prompts, one per row
    rule: object  # (logp_S, logp_T, logp_0) -> log q, from targets.make_rule
    initial: tuple | None = None  # (initial model, student prompts) for rules that read p_0, once the student has moved


class _Stream:
    """One model with its own KV cache, made from the prompts and advanced one token per step: by
    decoder.LeanDecoder where the architecture allows (the same logits without the framework's
    per-call overhead), else by the model's own forward."""

    def __init__(self, model, prompts: list[list[int]], pad_id: int, device, room: int = 64):
        self.model = model
        ids, self.attn = left_pad(prompts, pad_id, device)
        self.lean = LeanDecoder(model, ids, self.attn, room) if decoder.LEAN and supported(model) else None
        if self.lean is not None:
            self.logits = self.lean.logits
            return
        out = model(input_ids=ids, attention_mask=self.attn, position_ids=positions(self.attn),
                    use_cache=True, logits_to_keep=1)
        self.cache_kw = _cache_keyword(model)
        self.cache, self.logits = out[self.cache_kw], out.logits[:, -1].float()

    def step(self, tok: torch.Tensor) -> None:
        if self.lean is not None:
            self.logits = self.lean.step(tok)
            return
        self.attn = torch.cat([self.attn, torch.ones_like(self.attn[:, :1])], dim=1)
        position = positions(self.attn)[:, -1:]
        out = self.model(input_ids=tok[:, None], attention_mask=self.attn, position_ids=position,
                         use_cache=True, logits_to_keep=1, **{self.cache_kw: self.cache})
        self.cache, self.logits = out[self.cache_kw], out.logits[:, -1].float()


def _cache_keyword(model) -> str:
    """What the model's forward calls its KV cache: `cache` from transformers 5.25 (which warns
    on the old name), `past_key_values` before."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft wraps it
    return "cache" if "cache" in inspect.signature(type(base).forward).parameters else "past_key_values"


def sample(model, tokenizer, prompt_ids: list[list[int]], *, max_new_tokens: int,
           stop_ids: list[int], temperature: float = 1.0, top_p: float = 1.0,
           seed: int | None = None, row_offset: int = 0, global_rows: int | None = None,
           guide: Guide | None = None) -> Rollout:
    """Sample one completion per prompt. With `seed`, row i of this call uses global row
    `row_offset + i` of a (global_rows, V) noise table per step. With `guide`, each token is
    drawn from the aggregate of the student's and the teacher's distributions (two KV caches),
    and `logprobs` are under that aggregate, the distribution actually sampled from."""
    # inference mode: the same kernels as no_grad without its per-call bookkeeping (version counters,
    # view records), 5-23% of a small model's decoding step (benchmarks/decode_modes.py)
    with torch.inference_mode():
        completion, logprobs = _decode(model, tokenizer, prompt_ids, max_new_tokens, stop_ids, temperature,
                                       top_p, seed, row_offset, global_rows, guide)
    # outside it, normal tensors again: the training forward may save them for backward
    completion, logprobs = completion.clone(), logprobs.clone()
    mask, texts = completion_texts(tokenizer, completion, stop_ids)
    return Rollout([list(p) for p in prompt_ids], completion, mask, logprobs * mask, texts)


def completion_texts(tokenizer, completion: torch.Tensor, stop_ids: list[int]) -> tuple[torch.Tensor, list[str]]:
    """(mask, texts) of decoded token rows (B, T): a token is part of the completion up to and
    including the first stop token; texts drop special tokens."""
    stops = torch.tensor(stop_ids, device=completion.device)
    is_stop = torch.isin(completion, stops).long()
    mask = ((is_stop.cumsum(1) - is_stop) == 0).float()
    texts = [tokenizer.decode([t for t, m in zip(row, mrow) if m], skip_special_tokens=True)
             for row, mrow in zip(completion.tolist(), mask.tolist())]
    return mask, texts


def _decode(model, tokenizer, prompt_ids, max_new_tokens, stop_ids, temperature, top_p, seed, row_offset,
            global_rows, guide) -> tuple[torch.Tensor, torch.Tensor]:
    """The sampling loop: (tokens (B, T), their log-probs (B, T)), T up to the step every row stopped."""
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id
    streams = [_Stream(model, prompt_ids, pad_id, device, max_new_tokens)]
    if guide is not None:
        streams.append(_Stream(guide.model, guide.prompt_ids, pad_id, device, max_new_tokens))
        if guide.initial is not None:
            streams.append(_Stream(guide.initial[0], guide.initial[1], pad_id, device, max_new_tokens))
    B = len(prompt_ids)
    global_rows = global_rows or B
    stops = torch.tensor(stop_ids, device=device)
    tokens, logps, live = [], [], torch.ones(B, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        logits, temp = streams[0].logits, temperature
        if guide is not None:  # the rule works on log-probs at the sampling temperature
            t = temperature if temperature > 0 else 1.0
            logp_0 = F.log_softmax(streams[2].logits / t, -1) if len(streams) > 2 else None
            logits = guide.rule(F.log_softmax(logits / t, -1), F.log_softmax(streams[1].logits / t, -1), logp_0)
            temp = 1.0 if temperature > 0 else 0.0
        noise = None
        if seed is not None and temperature > 0:
            noise = gumbel_noise((global_rows, logits.shape[-1]), seed, step,
                                 slice(row_offset, row_offset + B), device)
        tok, lp = choose(logits, temp, top_p, noise)
        done = ~live
        tokens.append(tok.masked_fill_(done, pad_id))
        logps.append(lp.masked_fill_(done, 0.0))
        live = live & ~torch.isin(tok, stops)
        if not live.any():
            break
        for stream in streams:
            stream.step(tok)
    return torch.stack(tokens, dim=1), torch.stack(logps, dim=1)


def given_rollout(tokenizer, prompt_ids: list[list[int]], texts: list[str], device=None) -> Rollout:
    """A Rollout of text that was written elsewhere (reference solutions for SFT, the assistant
    turns of logged conversations), ending with EOS like a sampled one. Its `logprobs` are
    zeros: no sampling distribution produced it."""
    eos = tokenizer.eos_token_id
    comps = [tokenizer(t, add_special_tokens=False)["input_ids"] + [eos] for t in texts]
    return token_rollout(prompt_ids, comps, tokenizer.pad_token_id, list(texts), device)


def token_rollout(prompt_ids: list[list[int]], completions: list[list[int]], pad_id: int, texts: list[str],
                  device=None) -> Rollout:
    """A Rollout of completions given as token ids (right-padded, mask 1 on every given token,
    zero log-probs)."""
    T = max(len(c) for c in completions)
    ids = torch.full((len(completions), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(completions), T))
    for i, c in enumerate(completions):
        ids[i, :len(c)], mask[i, :len(c)] = torch.tensor(c), 1.0
    return Rollout([list(p) for p in prompt_ids], ids.to(device), mask.to(device),
                   torch.zeros_like(mask, device=device), texts)
