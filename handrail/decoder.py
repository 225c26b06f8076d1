"""A lean one-token step for Llama-family causal LMs (Llama, Qwen2; full attention, sdpa).

Sampling spends most of its time in one-token forward passes, and for a small model most of a
one-token pass is not arithmetic: the key/value cache is copied whole to append a column, masks,
cache objects and output records are built, and every layer is wrapped. `LeanDecoder` runs the
transformers forward's tensor operations on the same weights, elementwise ones in the same order
and the same matrix products, and nothing else: its logits match that forward's (to the bit on
the machines measured, BENCHMARKS.md §L7; tests allow float tolerance). The prompt is still
encoded by the model's own forward, one call per batch; only the per-token steps come here.

A model it does not recognise (another architecture, a peft-wrapped, hooked or sharded one,
another attention implementation, a rope that changes with length) is not `supported`, and the
caller keeps the transformers path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

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


class LeanDecoder:
    """One model's KV cache after the prompt, advanced one token per `step`.

    Keys and values live in buffers with room to grow: appending a column writes in place, where
    concatenating (what transformers' dynamic cache does) copies the whole cache every step — for
    short sequences that copy was most of a step. The weights are looked up once per batch, not
    through every module's attributes per token, and the rotary table and the padding mask are
    made once for every position the buffers can hold."""

    def __init__(self, model, hf_cache, attn: torch.Tensor, room: int):
        self.model, base, cfg = model, model.model, model.config
        self.hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.groups = cfg.num_attention_heads // cfg.num_key_value_heads
        self.embed, self.rotary, self.head = base.embed_tokens, base.rotary_emb, (model.lm_head.weight, model.lm_head.bias)
        self.norm = (base.norm.weight, base.norm.variance_epsilon)
        self.layers = []
        for layer in base.layers:
            a, m = layer.self_attn, layer.mlp
            self.layers.append((
                (layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon),
                (a.q_proj.weight, a.q_proj.bias), (a.k_proj.weight, a.k_proj.bias), (a.v_proj.weight, a.v_proj.bias),
                (a.o_proj.weight, a.o_proj.bias), a.scaling,
                (layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon),
                (m.gate_proj.weight, m.gate_proj.bias), (m.up_proj.weight, m.up_proj.bias),
                (m.down_proj.weight, m.down_proj.bias)))
        self.n = attn.shape[1]
        # transformers drops the mask when no row is padded, and sdpa then takes another path
        self.padded = not bool(attn.all())
        self.position = (attn.cumsum(-1) - 1).clamp(min=0)[:, -1:]
        self.keys = [layer.keys for layer in hf_cache.layers]
        self.values = [layer.values for layer in hf_cache.layers]
        # sdpa turns a boolean mask into this additive one inside every call; made once here instead
        self.mask = torch.zeros(attn.shape, dtype=self.keys[0].dtype, device=attn.device).masked_fill_(
            attn == 0, float("-inf"))
        self._make_room(room)

    def _make_room(self, room: int) -> None:
        def grown(t, dim):  # t's first n columns along dim, in a zeroed buffer `room` columns longer
            shape = list(t.shape)
            shape[dim] = self.n + room
            buf = t.new_zeros(shape)
            buf.narrow(dim, 0, self.n).copy_(t.narrow(dim, 0, self.n))
            return buf

        self.keys, self.values = [grown(k, -2) for k in self.keys], [grown(v, -2) for v in self.values]
        self.mask = grown(self.mask, -1)  # a new column is 0: attended (finished rows feed padding)
        self.capacity = self.n + room
        pos = torch.arange(self.capacity, device=self.mask.device)[None]
        cos, sin = self.rotary(self.keys[0], position_ids=pos)
        self.cos, self.sin = cos[0], sin[0]

    def step(self, tok: torch.Tensor) -> torch.Tensor:
        """Feed tok (B,) at each row's next position; return float logits (B, V) for the token after."""
        if self.n == self.capacity:
            self._make_room(self.n)  # double it: amortised
        n, hd, B = self.n + 1, self.hd, tok.shape[0]
        self.n, self.position = n, self.position + 1
        mask = self.mask[:, None, None, :n] if self.padded else None
        h = F.embedding(tok[:, None], self.embed.weight, self.embed.padding_idx)
        cos, sin = self.cos[self.position], self.sin[self.position]  # (B, 1, D)
        cos, sin = cos[:, :, None], sin[:, :, None]  # broadcast over heads
        for i, (n1, wq, wk, wv, wo, scale, n2, wg, wu, wd) in enumerate(self.layers):
            x = _rms(h, n1)
            q = F.linear(x, *wq).view(B, 1, -1, hd)
            k = F.linear(x, *wk).view(B, 1, -1, hd)
            v = F.linear(x, *wv).view(B, 1, -1, hd)
            q = (q * cos + _rotate_half(q) * sin).transpose(1, 2)
            k = (k * cos + _rotate_half(k) * sin).transpose(1, 2)
            self.keys[i][:, :, n - 1:n] = k
            self.values[i][:, :, n - 1:n] = v.transpose(1, 2)
            keys, values = self.keys[i][:, :, :n], self.values[i][:, :, :n]
            if self.groups == 1:
                o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale)
            elif mask is None:
                o = F.scaled_dot_product_attention(q, keys, values, scale=scale, enable_gqa=True)
            else:  # as transformers does for one query token: its heads folded onto their key/value head
                o = F.scaled_dot_product_attention(q.reshape(B, -1, self.groups, hd), keys, values,
                                                   attn_mask=mask, scale=scale)
            h = h + F.linear(o.reshape(B, 1, -1), *wo)  # (B, heads, 1, hd) is (B, 1, heads*hd) in memory
            x = _rms(h, n2)
            h = h + F.linear(F.silu(F.linear(x, *wg)) * F.linear(x, *wu), *wd)
        return F.linear(_rms(h, self.norm)[:, 0], *self.head).float()


def _rms(x: torch.Tensor, norm: tuple) -> torch.Tensor:
    weight, eps = norm
    if x.dtype == torch.float32:  # transformers' RMSNorm in float32 is these three operations
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))
    x32 = x.to(torch.float32)
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)
