"""A lean one-token step for Llama-family causal LMs (Llama, Qwen2; full attention, sdpa).

Sampling spends most of its time in one-token forward passes, and for a small model most of a
one-token pass is not arithmetic: the key/value cache is copied whole to append a column, masks,
cache objects and output records are built, and every layer is wrapped. `LeanDecoder` runs the
transformers forward's tensor operations on the same weights, elementwise ones in the same order
and the same matrix products, and nothing else; attention over a short float32 sequence is
computed directly rather than by sdpa's kernel (MATH_KEYS), so its logits match that forward's
to float rounding (tests hold them to 1e-5). It encodes the prompt too, writing its keys and
values straight into the buffers the steps extend.

`hidden_states` is the same encoding for a whole sequence (the teacher's pass, a reference's, and
the student's training forward, with gradient), returning the final hidden states of the columns
asked for; its last layer works only at those columns.

A model it does not recognise (another architecture, a peft-wrapped, hooked or sharded one,
another attention implementation, a rope that changes with length) is not `supported`, and the
caller keeps the transformers path.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.nn.functional as F

# Whether sampling and passes without gradient use this decoder where `supported` allows: the
# training option `lean_decoder` (set for the run by `lean()`), or for other commands
# HANDRAIL_LEAN_DECODE=0 (the escape hatch: every model by its own forward)
LEAN = os.environ.get("HANDRAIL_LEAN_DECODE", "1") != "0"


@contextlib.contextmanager
def lean(on: bool):
    """LEAN set to `on` inside the block, restored after it."""
    global LEAN
    before, LEAN = LEAN, on
    try:
        yield
    finally:
        LEAN = before

_ARCHITECTURES = {"LlamaForCausalLM", "Qwen2ForCausalLM"}


def supported(model) -> bool:
    if type(model).__name__ not in _ARCHITECTURES:
        return False
    cfg = model.config
    if getattr(cfg, "_attn_implementation", None) != "sdpa" or getattr(cfg, "hidden_act", None) != "silu":
        return False
    if any(t != "full_attention" for t in (getattr(cfg, "layer_types", None) or [])):
        return False
    if getattr(cfg, "pretraining_tp", 1) != 1:
        return False
    if model.training and getattr(cfg, "attention_dropout", 0.0):
        return False  # the forward would drop attention weights; the lean step never does
    for m in model.modules():  # offloading, quantisation or adapters hook in here; their forward is not ours to copy
        if m._forward_hooks or m._forward_pre_hooks:
            return False
    if any(type(p) is not torch.nn.Parameter or type(p.data) is not torch.Tensor for p in model.parameters()):
        return False  # sharded (DTensor) or quantised weights
    if "dynamic" in getattr(model.model.rotary_emb, "rope_type", "default"):
        return False  # its frequencies change with the length seen: no table computed once
    return True


def checkpointing(model) -> bool:
    """Whether the model recomputes its layers' activations in backward (transformers' flag, under
    either of its names): only its own forward does that."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


# Fusing copies a layer's q/k/v and gate/up weights into one matrix each, per batch (the weights
# change every step). Worth it where per-call overhead, not arithmetic, is most of a step: small
# models. Above this many bytes of copies a model keeps its own matrices, so that a large model
# never pays the memory (tests lower it to try both paths).
FUSE_BYTES = 64 << 20


class _Layer:
    """One decoder layer's weights, bound once per batch. `qkv` gives the rotated queries and keys
    of all heads in one tensor, and the values; `mlp` the MLP's output. Fused (FUSE_BYTES), one
    matrix product gives q, k and v, and rotate_half(q) and rotate_half(k) too: rotate_half is a
    signed permutation of each head's rows, so those rows are copied into the matrix (exact: a
    row's dot product does not depend on where the row sits), and the rotary embedding is then
    two products and a sum, as in the forward. Only one-token steps use the fused matrices: they
    save calls, which is what a step's time is, while the prompt's encoding (many rows a call) is
    arithmetic, and the rotated rows would add two thirds to its q/k/v products (measured: the
    fused prompt encoding was the slower)."""

    def __init__(self, layer, hd: int, fuse: bool):
        a, m = layer.self_attn, layer.mlp
        self.norm1 = (layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon)
        self.norm2 = (layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon)
        self.o, self.down = (a.o_proj.weight, a.o_proj.bias), (m.down_proj.weight, m.down_proj.bias)
        self.scale, self.hd = a.scaling, hd
        self.hq, self.hk = a.q_proj.weight.shape[0] // hd, a.k_proj.weight.shape[0] // hd
        self.q, self.k, self.v, self.gate, self.up = (
            (p.weight, p.bias) for p in (a.q_proj, a.k_proj, a.v_proj, m.gate_proj, m.up_proj))
        self.fused = fuse
        if fuse:
            self.qkv_w = _cat([self.q, self.k, _rotated(self.q, hd), _rotated(self.k, hd), self.v])
            self.gu_w, self.inner = _cat([self.gate, self.up]), self.gate[0].shape[0]

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x (B*T, d) -> rotated q and k heads (B, T, hq + hk, hd), v heads (B, T, hk, hd), for
        cos and sin (B, T, 1, hd)."""
        B, T, hd, nqk = cos.shape[0], cos.shape[1], self.hd, (self.hq + self.hk) * self.hd
        if self.fused and T == 1:  # a one-token step
            a = F.linear(x, *self.qkv_w)
            qk = a[:, :nqk].view(B, T, -1, hd) * cos + a[:, nqk:2 * nqk].view(B, T, -1, hd) * sin
            return qk, a[:, 2 * nqk:].view(B, T, -1, hd)
        qk = torch.cat((F.linear(x, *self.q), F.linear(x, *self.k)), -1).view(B, T, -1, hd)
        return qk * cos + _rotate_half(qk) * sin, F.linear(x, *self.v).view(B, T, -1, hd)

    def mlp(self, x: torch.Tensor, step: bool) -> torch.Tensor:
        if self.fused and step:
            gu = F.linear(x, *self.gu_w)
            return F.linear(F.silu(gu[:, :self.inner]) * gu[:, self.inner:], *self.down)
        return F.linear(F.silu(F.linear(x, *self.gate)) * F.linear(x, *self.up), *self.down)


def _rotated(proj: tuple, hd: int) -> tuple:
    """Weights and bias whose output is rotate_half of proj's, head by head."""
    def rot(t):
        t = t.view(-1, 2, hd // 2, *t.shape[1:])  # heads, halves, rows
        return torch.cat((-t[:, 1], t[:, 0]), 1).reshape(-1, *t.shape[3:])
    return rot(proj[0]), None if proj[1] is None else rot(proj[1])


def _cat(projs: list) -> tuple:
    w = torch.cat([p[0] for p in projs])
    if all(p[1] is None for p in projs):
        return w, None
    return w, torch.cat([p[1] if p[1] is not None else w.new_zeros(p[0].shape[0]) for p in projs])


class LeanDecoder:
    """One model's KV cache, made from the prompt and advanced one token per `step`.

    Keys and values live in buffers with room to grow: appending a column writes in place, where
    concatenating (what transformers' dynamic cache does) copies the whole cache every step — for
    short sequences that copy was most of a step. The weights are bound once per batch (and, for
    a small model, fused: `_Layer`), not looked up through every module per token, and the rotary
    table and the padding mask are made once for every position the buffers can hold."""

    def __init__(self, model, ids: torch.Tensor, attn: torch.Tensor, room: int):
        self._bind(model)
        base = model.model
        B, P = ids.shape
        w = base.embed_tokens.weight
        # no zeros: attention reads a column only once it is written
        self.keys = [w.new_empty(B, L.hk, P + room, self.hd) for L in self.layers]
        self.values = [w.new_empty(B, L.hk, P + room, self.hd) for L in self.layers]
        self.capacity, self.n, self.P = P + room, P, P
        pos = positions(attn)
        self.last = pos[:, -1]  # each row's last prompt position
        self._tables()
        # transformers drops the mask when no row is padded, and sdpa then takes another path
        self.padded = not bool(attn.all())
        # sdpa turns a boolean mask into this additive one inside every call; made once here instead
        # (a new column is 0: attended, as finished rows feed padding)
        self.mask = w.new_zeros(B, self.capacity)
        self.mask[:, :P].masked_fill_(attn == 0, float("-inf"))
        prompt_mask = _prompt_mask(attn, w.dtype) if self.padded else None
        h = self._layers(F.embedding(ids.reshape(-1), w, self.embed.padding_idx),
                         self.cos[pos][:, :, None], self.sin[pos][:, :, None], 0, prompt_mask)
        self.logits = self._logits(h.view(B, P, -1)[:, -1])

    def _bind(self, model) -> None:
        base, cfg = model.model, model.config
        self.hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.groups = cfg.num_attention_heads // cfg.num_key_value_heads
        self.embed, self.rotary, self.head = base.embed_tokens, base.rotary_emb, (model.lm_head.weight, model.lm_head.bias)
        self.norm = (base.norm.weight, base.norm.variance_epsilon)

        def size(*modules):
            return sum(p.numel() * p.element_size() for m in modules for p in m.parameters())

        copies = sum(2 * size(L.self_attn.q_proj, L.self_attn.k_proj)
                     + size(L.self_attn.v_proj, L.mlp.gate_proj, L.mlp.up_proj) for L in base.layers)
        self.layers = [_Layer(layer, self.hd, copies <= FUSE_BYTES) for layer in base.layers]

    @classmethod
    def shared(cls, model, passes: list[list[list[int]]], room: int, pad_id: int, min_shared: int = 8) -> LeanDecoder:
        """One decoder holding every pass's rows, pass after pass (row r of pass k at k * n + r),
        where the prompts of one row across passes (one record's prompts for several passes)
        share an opening, the chat template and the problem, which is encoded once for them all.
        Prompts sit from column 0 (not left-padded: a shared opening is then at the same columns
        in every row that shares it), and the columns after a shorter prompt, up to the longest,
        are masked. Openings are shared down a tree: the passes' common opening, row by row, up
        to the column every row reaches (when at least `min_shared` columns), then each group of
        passes that agree further, and so on; then each pass's own rest. A pass given twice (the
        same list) has its rows copied. The same logits, and the same steps after, as the
        passes encoded apart, to float rounding."""
        new = cls.__new__(cls)
        new._bind(model)
        n = len(passes[0])
        unique = [k for k, p in enumerate(passes) if not any(p is q for q in passes[:k])]
        lengths = torch.tensor([[len(ids) for ids in p] for p in passes])
        W, B = int(lengths.max()), len(passes) * n
        w = model.model.embed_tokens.weight
        new.capacity, new.n, new.P = W + room, W, W
        new.keys = [w.new_empty(B, L.hk, W + room, new.hd) for L in new.layers]
        new.values = [w.new_empty(B, L.hk, W + room, new.hd) for L in new.layers]
        for b in new.keys + new.values:
            b[:, :, :W].zero_()  # a gap after a shorter prompt is masked but still read: finite
        lengths = lengths.view(-1).to(w.device)
        new.mask = w.new_zeros(B, W + room)
        new.mask[:, :W].masked_fill_(torch.arange(W, device=w.device) >= lengths[:, None], float("-inf"))
        new.last = lengths - 1
        new.padded = True
        new._tables()
        new.logits = None
        new._share(passes, unique, 0, pad_id, min_shared)
        for k, p in enumerate(passes):
            if k not in unique:  # a copy of the first pass given as the same list
                first = next(j for j in unique if passes[j] is p)
                new._copy_pass(first, k, n, slice(None))
                new.logits[k * n:(k + 1) * n] = new.logits[first * n:(first + 1) * n]
        return new

    def _copy_pass(self, src: int, dst: int, n: int, cols: slice) -> None:
        """Pass `src`'s keys and values (its n rows) into pass `dst`'s rows, at columns `cols`."""
        for b in self.keys + self.values:
            b[dst * n:(dst + 1) * n, :, cols] = b[src * n:(src + 1) * n, :, cols]

    def _share(self, passes, group: list[int], start: int, pad_id: int, min_shared: int) -> None:
        """Encode `group`'s passes from column `start` on (every row's columns before it written)."""
        n = len(passes[0])

        def reach(ks):  # the column every row's prompts in passes ks agree up to, each leaving its last token
            return min(min(len(os.path.commonprefix([passes[k][r] for k in ks])),
                           *(len(passes[k][r]) - 1 for k in ks)) for r in range(n))

        if len(group) > 1:
            end = reach(group)
            if end - start >= min_shared:  # encoded in the first pass's rows, copied to the others'
                first = group[0]
                self._encode(range(first * n, (first + 1) * n),
                             [passes[first][r][start:end] for r in range(n)], start, pad_id)
                for k in group[1:]:
                    self._copy_pass(first, k, n, slice(start, end))
                start = end
            while group:  # the passes that agree with the first further than this, then the rest
                near = [k for k in group if k == group[0] or reach([group[0], k]) - start >= min_shared]
                group = [k for k in group if k not in near]
                if len(near) > 1:
                    self._share(passes, near, start, pad_id, min_shared)
                else:
                    self._own(passes, near[0], start, pad_id)
            return
        self._own(passes, group[0], start, pad_id)

    def _own(self, passes, k: int, start: int, pad_id: int) -> None:
        """Pass k's prompts from column `start` to their ends, and its rows' first logits."""
        n = len(passes[0])
        rows = range(k * n, (k + 1) * n)
        h = self._encode(rows, [passes[k][r][start:] for r in range(n)], start, pad_id)
        ends = torch.tensor([len(passes[k][r]) - 1 - start for r in range(n)], device=h.device)
        logits = self._logits(h[torch.arange(n, device=h.device), ends])
        if self.logits is None:
            self.logits = logits.new_empty(len(passes) * n, logits.shape[-1])
        self.logits[k * n:(k + 1) * n] = logits

    def _encode(self, rows: range, pieces: list[list[int]], start: int, pad_id: int) -> torch.Tensor:
        """Write rows' keys and values at columns start.. for `pieces` (each row's next tokens,
        right-padded: a row's padding comes after its tokens, so no token of it attends to it);
        return the final layer's hidden states (rows, T, d)."""
        T, device = max(map(len, pieces)), self.keys[0].device
        ids = torch.tensor([p + [pad_id] * (T - len(p)) for p in pieces], device=device)
        R = len(pieces)
        causal = torch.zeros(T, start + T, dtype=self.keys[0].dtype, device=device)
        causal[:, start:].masked_fill_(torch.ones(T, T, dtype=torch.bool, device=device).triu(1), float("-inf"))
        cos = self.cos[start:start + T][None, :, None].expand(R, T, 1, -1)
        sin = self.sin[start:start + T][None, :, None].expand(R, T, 1, -1)
        h = self._layers(F.embedding(ids.reshape(-1), self.embed.weight, self.embed.padding_idx), cos, sin, start,
                         causal[None, None], rows=slice(rows.start, rows.stop))
        return h.view(R, T, -1)

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only `rows` (indices, in the order given): rows that have stopped stop costing a
        share of every later step. A row's logits then come from products over fewer rows, the
        same to float rounding (not to the bit)."""
        self.keys = [k.index_select(0, rows) for k in self.keys]
        self.values = [v.index_select(0, rows) for v in self.values]
        self.mask, self.last = self.mask.index_select(0, rows), self.last.index_select(0, rows)
        self.cos_steps, self.sin_steps = self.cos_steps.index_select(1, rows), self.sin_steps.index_select(1, rows)

    def _tables(self) -> None:
        """The rotary table for every position the buffers hold, and each decoding step's rows of
        it, (steps, B, 1, 1, hd): a step takes its own with one index, not a gather per step."""
        pos = torch.arange(self.capacity, device=self.keys[0].device)
        cos, sin = self.rotary(self.keys[0], position_ids=pos[None])
        self.cos, self.sin = cos[0], sin[0]
        ahead = self.last[None] + 1 + pos[:self.capacity - self.P, None]
        self.cos_steps, self.sin_steps = self.cos[ahead][:, :, None, None], self.sin[ahead][:, :, None, None]

    def _make_room(self) -> None:
        """Double the buffers (amortised: once in a while)."""
        def grown(t, dim, new):  # t, then as many columns again along dim
            extra = list(t.shape)
            extra[dim] = self.capacity
            return torch.cat([t, new(extra)], dim)

        # keys and values: a column is read only once written; the mask's new columns: attended (0)
        self.keys = [grown(k, 2, k.new_empty) for k in self.keys]
        self.values = [grown(v, 2, v.new_empty) for v in self.values]
        self.mask = grown(self.mask, 1, self.mask.new_zeros)
        self.capacity *= 2
        self._tables()

    def _layers(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start: int, mask,
                rows: slice = slice(None)) -> torch.Tensor:
        """Run h (B*T, d), rows with rotary cos and sin (B, T, 1, hd), through every layer, writing
        the keys and values at buffer columns start..start+T (of the buffers' `rows`); `mask` is the
        additive attention mask (or None). Rows stay two-dimensional (the matrix products' own
        shape) except in attention."""
        B, T = cos.shape[:2]
        n = start + T
        for i, w in enumerate(self.layers):
            qk, v = w.qkv(_rms(h, w.norm1), cos, sin)
            keys, values = self.keys[i][rows], self.values[i][rows]
            keys[:, :, start:n] = qk[:, :, w.hq:].transpose(1, 2)
            values[:, :, start:n] = v.transpose(1, 2)
            o = self._attend(qk[:, :, :w.hq].transpose(1, 2), keys[:, :, :n], values[:, :, :n], mask, w.scale)
            h = h + F.linear(o.transpose(1, 2).reshape(B * T, -1), *w.o)
            h = h + w.mlp(_rms(h, w.norm2), T == 1)
        return h

    def _attend(self, q, keys, values, mask, scale):
        return _attend(q, keys, values, mask, scale, self.groups)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(_rms(h, self.norm), *self.head).float()

    def step(self, tok: torch.Tensor) -> torch.Tensor:
        """Feed tok (B,) at each row's next position; return float logits (B, V) for the token after."""
        if self.n == self.capacity:
            self._make_room()
        j = self.n - self.P  # steps taken
        self.n += 1
        mask = self.mask[:, None, None, :self.n] if self.padded else None
        h = self._layers(F.embedding(tok, self.embed.weight, self.embed.padding_idx),
                         self.cos_steps[j], self.sin_steps[j], self.n - 1, mask)
        return self._logits(h)


def hidden_states(model, ids: torch.Tensor, attn: torch.Tensor, pos: torch.Tensor,
                  span: tuple[int, int]) -> torch.Tensor:
    """The final hidden states (B, span[1], d) at columns span[0]..span[0] + span[1] of the
    left-padded `ids` at positions `pos` (a teacher's pass, a reference's, or the student's
    training forward, with gradient): the model's decoder operations, as `LeanDecoder` encodes a
    prompt, with the last layer's attention output, MLP and the final norm computed at the span's
    columns only (elsewhere they are never read, and their gradient is zero). The model's forward
    to float rounding, values and gradients (tests/test_rollout.py), without its per-call framework."""
    base, cfg = model.model, model.config
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    groups = cfg.num_attention_heads // cfg.num_key_value_heads
    layers = [_Layer(layer, hd, fuse=False) for layer in base.layers]
    w = base.embed_tokens.weight
    B, T = ids.shape
    start, n = span
    cos, sin = base.rotary_emb(w, position_ids=pos)
    cos, sin = cos[:, :, None], sin[:, :, None]
    # transformers drops the mask where no row is padded and sdpa then runs causal; the last
    # layer's queries are a suffix, which a causal flag would align to the wrong keys, so it
    # always gets the mask's rows
    full = _prompt_mask(attn, w.dtype)
    mask, last_mask = (full if not bool(attn.all()) else None), full[:, :, start:start + n]
    h = F.embedding(ids.reshape(-1), w, base.embed_tokens.padding_idx)
    for i, L in enumerate(layers):
        qk, v = L.qkv(_rms(h, L.norm1), cos, sin)
        keys, values = qk[:, :, L.hq:].transpose(1, 2), v.transpose(1, 2)
        q = qk[:, :, :L.hq].transpose(1, 2)
        if i < len(layers) - 1:
            o = _attend(q, keys, values, mask, L.scale, groups)
            h = h + F.linear(o.transpose(1, 2).reshape(B * T, -1), *L.o)
        else:
            o = _attend(q[:, :, start:start + n], keys, values, last_mask, L.scale, groups)
            h = h.view(B, T, -1)[:, start:start + n].reshape(B * n, -1) + F.linear(o.transpose(1, 2).reshape(B * n, -1), *L.o)
        h = h + L.mlp(_rms(h, L.norm2), False)
    return _rms(h, (base.norm.weight, base.norm.variance_epsilon)).view(B, n, -1)


def _prompt_mask(attn: torch.Tensor, dtype) -> torch.Tensor:
    """The additive (B, 1, T, T) mask for left-padded rows: causal and padding; a padding row that
    sees nothing sees all (kept finite), as transformers makes it."""
    T = attn.shape[1]
    see = torch.ones(T, T, dtype=torch.bool, device=attn.device).tril()[None] & attn.bool()[:, None, :]
    see |= ~see.any(-1, keepdim=True)
    return torch.zeros(attn.shape[0], 1, T, T, dtype=dtype, device=attn.device).masked_fill_(~see[:, None], float("-inf"))


# sdpa's CPU kernel (flash attention) pays a fixed cost per call and per block that, for short
# sequences, outweighs the arithmetic: on the lab's model (16 rows, 4 heads of 32) a layer's
# attention took 0.58 ms against 0.31 ms done directly at 51 columns, and forward with backward 2.3
# against 1.4 ms; the two meet near 250 columns (benchmarks/HISTORY.md §11). So float32 attention over at
# most MATH_KEYS keys, with at most MATH_SCORES scores in all (the direct way holds them, and
# backward keeps them), is computed as products and a softmax. The same function to float
# rounding, not to the bit. 0 turns it off (tests and benchmarks compare the two).
MATH_KEYS = 160
MATH_SCORES = 1 << 22


def _attend(q, keys, values, mask, scale, groups: int):
    """Attention for q (B, heads, Tq, hd) over keys and values (B, kv heads, T, hd), with the
    additive `mask` (B, 1, Tq, T); no mask means causal (Tq == T). Short float32 sequences are
    computed directly (MATH_KEYS); otherwise sdpa as transformers calls it (the same kernel)."""
    B, H, Tq, hd = q.shape
    if (q.dtype == torch.float32 and keys.shape[2] <= MATH_KEYS and B * H * Tq * keys.shape[2] <= MATH_SCORES
            and not torch.is_autocast_enabled(q.device.type)):
        return _direct(q, keys, values, mask, scale, groups)
    causal = mask is None and Tq > 1
    if groups == 1:
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale, is_causal=causal)
    if mask is None:
        return F.scaled_dot_product_attention(q, keys, values, scale=scale, is_causal=causal, enable_gqa=True)
    if Tq == 1:  # one query token: its heads folded onto their key/value head
        o = F.scaled_dot_product_attention(q.reshape(B, H // groups, groups, hd), keys, values,
                                           attn_mask=mask, scale=scale)
        return o.reshape(B, H, 1, hd)
    Hk, n = keys.shape[1], keys.shape[2]
    keys = keys[:, :, None].expand(B, Hk, groups, n, hd).reshape(B, H, n, hd)
    values = values[:, :, None].expand(B, Hk, groups, n, hd).reshape(B, H, n, hd)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale)


def _direct(q, keys, values, mask, scale, groups: int):
    """softmax(q kᵀ · scale + mask) v, each key/value head's query heads as one batch of rows."""
    B, H, Tq, hd = q.shape
    Hk, n = keys.shape[1], keys.shape[2]
    q = q.reshape(B, Hk, groups * Tq, hd)  # query heads h = kv head h // groups, as transformers repeats them
    # in place: the product's backward needs its inputs, not its output
    s = torch.matmul(q, keys.transpose(-1, -2)).view(B, Hk, groups, Tq, n).mul_(scale)
    if mask is not None:
        s.add_(mask[:, :, None])  # (B, 1, 1, Tq, n): every head alike
    elif Tq > 1:
        s.add_(torch.full((Tq, n), float("-inf"), dtype=q.dtype, device=q.device).triu_(1))
    return torch.matmul(s.softmax(-1).view(B, Hk, groups * Tq, n), values).view(B, H, Tq, hd)


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Each column's position in its row, for left-padded rows (padding at 0)."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def _rms(x: torch.Tensor, norm: tuple) -> torch.Tensor:
    weight, eps = norm
    if x.dtype == torch.float32:  # transformers' RMSNorm in float32: the same numbers, one call
        return F.rms_norm(x, weight.shape, weight, eps)
    x32 = x.to(torch.float32)
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)
