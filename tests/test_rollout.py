import torch

from handrail.runtime.evaluate import evaluate, prompt_ids
from handrail.runtime.models import load_model, stop_ids
from handrail.commands.sources import eval_records
from handrail.engine.rollout import left_pad, positions, sample


def _prompts(tok, tpl, n=6):
    _, recs = eval_records("chain", None, level=2, n=n)
    recs[1].prompt = recs[1].prompt + "+1+1+1"  # different prompt lengths in one batch
    return prompt_ids(tok, recs, tpl)


def test_greedy_matches_hf_generate(tiny_model):
    model, tok, tpl = load_model(tiny_model)
    ids = _prompts(tok, tpl)
    r = sample(model, tok, ids, max_new_tokens=24, stop_ids=stop_ids(tok), temperature=0)
    x, attn = left_pad(ids, tok.pad_token_id)
    ref = model.generate(input_ids=x, attention_mask=attn, max_new_tokens=24, do_sample=False,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)[:, x.shape[1]:]
    for i in range(len(ids)):
        n = int(r.completion_mask[i].sum())
        assert r.completion_ids[i, :n].tolist() == ref[i, :n].tolist()


def test_logprobs_match_a_full_forward_and_mask_ends_at_eos(tiny_model):
    model, tok, tpl = load_model(tiny_model)
    ids = _prompts(tok, tpl)
    r = sample(model, tok, ids, max_new_tokens=40, stop_ids=stop_ids(tok), temperature=0.7, seed=3)
    x, attn = left_pad(ids, tok.pad_token_id)
    full = torch.cat([x, r.completion_ids], 1)
    fattn = torch.cat([attn, r.completion_mask.long()], 1)
    with torch.no_grad():
        logits = model(input_ids=full, attention_mask=fattn, position_ids=positions(fattn)).logits
    P = x.shape[1]
    lp = torch.log_softmax(logits[:, P - 1:-1].float() / 0.7, -1).gather(-1, r.completion_ids[..., None])[..., 0]
    assert torch.allclose(lp * r.completion_mask, r.logprobs, atol=1e-4)
    for row, m in zip(r.completion_ids.tolist(), r.completion_mask.tolist()):
        n = int(sum(m))
        assert m == [1.0] * n + [0.0] * (len(m) - n)
        assert tok.eos_token_id not in row[:n - 1]  # nothing after the first stop is kept


def test_a_row_samples_the_same_alone_or_in_a_batch(tiny_model):
    """Seeded noise is indexed by global row: the basis of multi-process reproducibility."""
    model, tok, tpl = load_model(tiny_model)
    ids = _prompts(tok, tpl)
    kw = dict(max_new_tokens=30, stop_ids=stop_ids(tok), temperature=1.0, seed=11)
    whole = sample(model, tok, ids, **kw)
    second_half = sample(model, tok, ids[3:], row_offset=3, global_rows=6, **kw)
    assert whole.texts[3:] == second_half.texts
    assert sample(model, tok, ids, **{**kw, "seed": 12}).texts != whole.texts


def test_evaluate_reports_all_fields(tiny_model):
    model, tok, tpl = load_model(tiny_model)
    task, recs = eval_records(None, None, n=8)
    res = evaluate(model, tok, tpl, recs, task=task, samples=2, max_new_tokens=32)
    assert {"accuracy", "accuracy_sampled", "leak_rate", "n", "tokens", "seconds"} <= set(res)
    assert res["n"] == 8 and 0 <= res["accuracy"] <= 1 and res["tokens"] > 0


def _teacher_prompts(tok, tpl, n=6):
    from handrail.data.records import teacher_prompt

    _, recs = eval_records("chain", None, level=2, n=n)
    return [tok(teacher_prompt(tok, r, tpl), add_special_tokens=False)["input_ids"] for r in recs]


def test_guided_by_itself_is_plain_sampling(tiny_model):
    """With the teacher's distribution equal to the student's, every rule returns p_S."""
    from handrail.engine.rollout import Guide
    from handrail.engine.targets import make_rule

    model, tok, tpl = load_model(tiny_model)
    ids = _prompts(tok, tpl)
    kw = dict(max_new_tokens=30, stop_ids=stop_ids(tok), temperature=1.0, seed=5)
    plain = sample(model, tok, ids, **kw)
    for rule in ("trust-region", "support", "none"):
        guided = sample(model, tok, ids, guide=Guide(model, ids, make_rule(rule)), **kw)
        assert guided.texts == plain.texts


def test_guided_with_rule_none_follows_the_teacher_exactly(tiny_model):
    """q = p_T: greedy guided decoding from the student prompt writes what the teacher writes
    greedily from its own prompt, which exercises the second KV cache end to end."""
    from handrail.engine.rollout import Guide
    from handrail.engine.targets import make_rule

    model, tok, tpl = load_model(tiny_model)
    ids, t_ids = _prompts(tok, tpl), _teacher_prompts(tok, tpl)
    ids[1] = _teacher_prompts(tok, tpl)[1]  # different lengths in the two caches
    kw = dict(max_new_tokens=30, stop_ids=stop_ids(tok), temperature=0)
    guided = sample(model, tok, ids, guide=Guide(model, t_ids, make_rule("none")), **kw)
    assert guided.texts == sample(model, tok, t_ids, **kw).texts
    tr = sample(model, tok, ids, guide=Guide(model, t_ids, make_rule("trust-region")),
                **{**kw, "temperature": 1.0, "seed": 1})
    assert torch.isfinite(tr.logprobs).all() and tr.n_tokens > 0


# -- the lean decoding step (decoder.py) ----------------------------------------------------------
def _stream_logits(model, prompts, lean, steps, room, monkeypatch):
    import handrail.engine.rollout as R

    monkeypatch.setattr(R.decoder, "LEAN", lean)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        s = R._Stream(model, prompts, 0, "cpu", room)
        assert (s.lean is not None) == lean
        logits = [s.logits]
        for _ in range(steps):
            s.step(torch.randint(3, model.config.vocab_size, (len(prompts),), generator=g))
            logits.append(s.logits)
    return torch.stack(logits)


def _arch(kind):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    common = dict(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                  attn_implementation="sdpa")
    if kind == "llama-gqa":
        return LlamaForCausalLM(LlamaConfig(num_attention_heads=6, num_key_value_heads=2, **common)).eval()
    return Qwen2ForCausalLM(Qwen2Config(num_attention_heads=6, num_key_value_heads=3, **common)).eval()  # q/k/v biases


def test_lean_step_matches_the_models_forward(tiny_model, monkeypatch):
    """Every architecture the lean step takes, with padded and unpadded batches, past the room
    its cache was given (so the buffers grow): the same logits as the model's own forward, from
    the prompt's (the lean prefill) on."""
    import pytest

    import handrail.engine.decoder as D

    models = [("tiny", load_model(tiny_model)[0].eval()), ("llama-gqa", _arch("llama-gqa")), ("qwen2", _arch("qwen2")),
              ("bf16", _arch("llama-gqa").to(torch.bfloat16))]
    for (name, model), fuse, keys in [(m, f, k) for m in models for f in (True, False) for k in (0, 160)]:
        # both ways of binding the weights: fused (small models) and the model's own matrices;
        # attention by sdpa alone, and computed directly where it applies (decoder.MATH_KEYS)
        monkeypatch.setattr(D, "FUSE_BYTES", 1 << 40 if fuse else 0)
        monkeypatch.setattr(D, "MATH_KEYS", keys)
        with torch.no_grad():
            assert all(w.fused == fuse for w in D.LeanDecoder(model, *left_pad([[3, 4, 5]], 0), 4).layers)
        V = model.config.vocab_size
        for lengths in ((3, 9, 5, 1), (6, 6, 6, 6)):
            prompts = [[(7 * i + j) % (V - 3) + 3 for j in range(n)] for i, n in enumerate(lengths)]
            lean = _stream_logits(model, prompts, True, 40, 8, monkeypatch)
            ref = _stream_logits(model, prompts, False, 40, 8, monkeypatch)
            tol = 1e-2 if name == "bf16" else 1e-5
            assert torch.allclose(lean, ref, atol=tol, rtol=tol), (name, fuse, keys, lengths, (lean - ref).abs().max())
            if lengths[0] == 6:
                with pytest.raises(AssertionError):  # the comparison can fail: other prompts, other logits
                    other = [[p[0] + 1] + p[1:] for p in prompts]
                    assert torch.allclose(_stream_logits(model, other, True, 40, 8, monkeypatch), ref, atol=1e-5)


def test_dropped_rows_leave_the_rest_alone(tiny_model):
    """keep(): rows that stopped leave the decoder, and the others step on as before (a decoder of
    several passes, one given twice, their buffers growing past the room given)."""
    import handrail.engine.decoder as D

    for name, model in _models(tiny_model):
        V, g = model.config.vocab_size, torch.Generator().manual_seed(2)
        passes = [[[3, 4, 5, 6, 7], [8, 9]], [[5] * 9, [6, 7, 8, 9, 10, 11, 12, 13, 14]]]
        passes.append(passes[0])
        tol = 1e-2 if name == "bf16" else 1e-5
        with torch.no_grad():
            alone = [D.LeanDecoder(model, *left_pad(p, 0), 4) for p in passes]
            dec = D.LeanDecoder.shared(model, passes, 4, pad_id=0)
            got, want = [dec.logits], [torch.cat([a.logits for a in alone])]
            rows = torch.arange(6)
            for step in range(10):  # past the room given: the buffers grow
                tok = torch.randint(3, V, (6,), generator=g)
                want.append(torch.cat([a.step(t) for a, t in zip(alone, tok.split(2))]))
                if step == 4:  # the second pass's rows and one of the copy's stop
                    rows = torch.tensor([0, 1, 4])
                    dec.keep(rows)
                got.append(torch.zeros_like(want[-1]).index_copy_(0, rows, dec.step(tok[rows])))
            for step, (a, b) in enumerate(zip(got, want)):
                kept = torch.arange(6) if step <= 4 else rows  # got[k]: after k steps
                assert torch.allclose(a[kept], b[kept], atol=tol, rtol=tol), (name, step, (a - b)[kept].abs().max())
            assert not torch.allclose(got[6][2], want[6][2], atol=tol)  # a dropped row is not computed


def test_shared_openings_encode_once_and_step_as_the_passes_encoded_apart(tiny_model, monkeypatch):
    """LeanDecoder.shared: passes whose prompts share openings row by row (a tree: all four agree
    on 9 or more tokens, three of them further, one pass given twice) give each pass's logits,
    and the same steps after, as each pass encoded alone; the shared openings are encoded once."""
    import handrail.engine.decoder as D

    # tokens below the tiny model's vocabulary (22); where passes part, their next tokens differ
    head = [[3, 4, 5, 6, 7, 8, 9, 10, 11], [12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 3]]  # per row: 9 and 11 tokens
    ref = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [14, 15, 16, 17, 18, 19, 20, 21, 4]]
    passes = [[h + [19, 20] for h in head],  # the student: a row's opening, its own end
              [h + r + [15, 16, 17] for h, r in zip(head, ref)],  # the teacher
              [h + r[:8] + [20] for h, r in zip(head, ref)],  # another teacher, agreeing on 8 more
              [h + [21] * 12 for h in head]]  # leaves after the opening
    passes.append(passes[1])  # the teacher given twice: its rows copied
    encoded = []
    real = D.LeanDecoder._encode
    monkeypatch.setattr(D.LeanDecoder, "_encode", lambda self, rows, pieces, *a: encoded.append(
        sum(map(len, pieces))) or real(self, rows, pieces, *a))
    for name, model in _models(tiny_model):
        V, g, tol = model.config.vocab_size, torch.Generator().manual_seed(3), (1e-2 if name == "bf16" else 1e-5)
        with torch.no_grad():
            alone = [D.LeanDecoder(model, *left_pad(p, 0), 4) for p in passes]
            encoded.clear()
            dec = D.LeanDecoder.shared(model, passes, 4, pad_id=0)
            # the 9 columns all four share, once for both rows (18); the 8 more both teachers share
            # (16); each pass's own rest (6, 10, 4, 26): 80 tokens, against 150 encoded apart
            assert sum(encoded) == 80
            got, want = [dec.logits], [torch.cat([a.logits for a in alone])]
            for _ in range(7):  # past the room given: the buffers grow
                tok = torch.randint(3, V, (10,), generator=g)
                want.append(torch.cat([a.step(t) for a, t in zip(alone, tok.split(2))]))
                got.append(dec.step(tok))
            for step, (a, b) in enumerate(zip(got, want)):
                assert torch.allclose(a, b, atol=tol, rtol=tol), (name, step, (a - b).abs().max())


def _padded_batch(V, lengths):
    T = max(lengths)
    ids = torch.tensor([[0] * (T - n) + [(5 * i + j) % (V - 3) + 3 for j in range(n)] for i, n in enumerate(lengths)])
    return ids, (torch.arange(T)[None] >= T - torch.tensor(lengths)[:, None]).long()


def _models(tiny_model):
    return [("tiny", load_model(tiny_model)[0].eval()), ("llama-gqa", _arch("llama-gqa")), ("qwen2", _arch("qwen2")),
            ("bf16", _arch("llama-gqa").to(torch.bfloat16))]


def test_lean_pass_without_gradient_matches_the_models_forward(tiny_model, monkeypatch):
    """decoder.hidden_states (a teacher's or reference's pass: HiddenStates with a span, no grad)
    against the model's own forward: every architecture the lean path takes, padded and unpadded
    rows, spans from one column to all but the first, with sdpa and with the direct attention."""
    import handrail.engine.decoder as D
    from handrail.runtime.models import HiddenStates
    from handrail.engine.rollout import positions

    calls = []
    lean = D.hidden_states
    monkeypatch.setattr(D, "hidden_states", lambda *a: calls.append(1) or lean(*a))
    for name, model in _models(tiny_model):
        hs = HiddenStates(model)
        for lengths, keys in [(ln, k) for ln in ((3, 12, 7, 1), (12, 12, 12, 12)) for k in (0, 160)]:
            monkeypatch.setattr(D, "MATH_KEYS", keys)  # sdpa alone, and the direct attention where it applies
            ids, attn = _padded_batch(model.config.vocab_size, lengths)
            T = ids.shape[1]
            for span in ((T - 1, 1), (T - 5, 5), (1, T - 1)):
                with torch.no_grad():
                    monkeypatch.setattr(D, "LEAN", False)
                    ref = hs(ids, attn, positions(attn), span=span)
                    monkeypatch.setattr(D, "LEAN", True)
                    got = hs(ids, attn, positions(attn), span=span)
                tol = 1e-2 if name == "bf16" else 1e-5
                # rows 0..3 at every span column that is a real token (a padding column's state is unused)
                real = attn[:, span[0]:span[0] + span[1]].bool()
                assert torch.allclose(got[real], ref[real], atol=tol, rtol=tol), (name, lengths, span, keys)
    assert len(calls) == 4 * 4 * 3


def test_lean_training_forward_has_the_models_gradient(tiny_model, monkeypatch):
    """With a gradient (the student's forward for the loss), the lean pass gives every parameter
    the gradient the model's own forward gives; with activation checkpointing, which only the
    model's forward does, the model's forward runs."""
    import handrail.engine.decoder as D
    from handrail.runtime.models import HiddenStates
    from handrail.engine.rollout import positions

    calls = []
    lean = D.hidden_states
    monkeypatch.setattr(D, "hidden_states", lambda *a: calls.append(1) or lean(*a))
    for name, model in _models(tiny_model)[:3]:
        hs = HiddenStates(model.train())
        ids, attn = _padded_batch(model.config.vocab_size, (3, 12, 7, 1))
        span = (4, 8)
        weight = torch.randn(4, span[1], model.config.hidden_size, generator=torch.Generator().manual_seed(0))

        def grads(lean):
            monkeypatch.setattr(D, "LEAN", lean)
            model.zero_grad(set_to_none=True)
            # a loss applied inside the forward, as the methods' are; padding columns weigh nothing
            out = hs(ids, attn, positions(attn), span=span,
                     loss=lambda head, h: ((h * weight).sum(-1) + head(h).logsumexp(-1)).mul(attn[:, 4:12]).sum())
            out.backward()
            return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

        n = len(calls)
        ref_loss, ref = grads(False)
        loss, got = grads(True)
        assert len(calls) == n + 1
        assert torch.allclose(loss, ref_loss, rtol=1e-5), name
        for k in ref:
            err = (got[k] - ref[k]).abs().max() / ref[k].abs().max()  # float rounding, relative to the gradient's scale
            assert err < 1e-5, (name, k, err)
    model = load_model(tiny_model)[0].train()
    model.activation_checkpointing_enable({"use_reentrant": False})
    assert D.checkpointing(model) and not D.checkpointing(load_model(tiny_model)[0])
    n = len(calls)
    ids, attn = _padded_batch(model.config.vocab_size, (3, 5))
    out = HiddenStates(model)(ids, attn, positions(attn), span=(1, 4))
    assert out.requires_grad and len(calls) == n


def test_lean_step_declines_what_it_does_not_know(tiny_model):
    from handrail.engine.decoder import supported
    from handrail.runtime.models import add_lora

    model = load_model(tiny_model)[0]
    assert supported(model)
    eager = load_model(tiny_model)[0]
    eager.config._attn_implementation = "eager"
    assert not supported(eager)
    assert not supported(add_lora(load_model(tiny_model)[0], 4, 8, "all-linear"))
    dropout = load_model(tiny_model)[0].train()
    dropout.config.attention_dropout = 0.1
    assert not supported(dropout) and supported(dropout.eval())
    from transformers import LlamaConfig, LlamaForCausalLM

    dynamic = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=2, attn_implementation="sdpa",
                                           rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}))
    assert not supported(dynamic.eval())  # its rope changes with the length seen
    hooked = load_model(tiny_model)[0]
    hooked.model.layers[0].register_forward_hook(lambda *a: None)
    assert not supported(hooked)


def test_sampling_is_the_same_with_and_without_the_lean_step(tiny_model, monkeypatch):
    import handrail.engine.rollout as R

    model, tok, tpl = load_model(tiny_model)
    ids = _prompts(tok, tpl)
    kw = dict(max_new_tokens=30, stop_ids=stop_ids(tok), temperature=1.0, seed=5)
    monkeypatch.setattr(R.decoder, "LEAN", False)
    ref = sample(model, tok, ids, **kw)
    monkeypatch.setattr(R.decoder, "LEAN", True)
    lean = sample(model, tok, ids, **kw)
    assert lean.texts == ref.texts
    assert torch.allclose(lean.logprobs, ref.logprobs, atol=1e-5)


def test_a_rollout_can_be_trained_on(tiny_model):
    """Sampling runs in inference mode; what it returns must be ordinary tensors, which a training
    forward may save for backward (an inference tensor there is an error)."""
    model, tok, tpl = load_model(tiny_model)
    ro = sample(model, tok, _prompts(tok, tpl), max_new_tokens=8, stop_ids=stop_ids(tok), temperature=1.0, seed=0)
    assert not any(t.is_inference() for t in (ro.completion_ids, ro.completion_mask, ro.logprobs))
    w = torch.randn(model.config.vocab_size, 4, requires_grad=True)
    (torch.nn.functional.embedding(ro.completion_ids, w) * ro.completion_mask[..., None]).sum().backward()
    assert w.grad is not None
