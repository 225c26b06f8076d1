import torch

from handrail.evaluate import evaluate, prompt_ids
from handrail.models import load_model, stop_ids
from handrail.run import eval_records
from handrail.rollout import left_pad, positions, sample


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
    from handrail.data import teacher_prompt

    _, recs = eval_records("chain", None, level=2, n=n)
    return [tok(teacher_prompt(tok, r, tpl), add_special_tokens=False)["input_ids"] for r in recs]


def test_guided_by_itself_is_plain_sampling(tiny_model):
    """With the teacher's distribution equal to the student's, every rule returns p_S."""
    from handrail.rollout import Guide
    from handrail.targets import make_rule

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
    from handrail.rollout import Guide
    from handrail.targets import make_rule

    model, tok, tpl = load_model(tiny_model)
    ids, t_ids = _prompts(tok, tpl), _teacher_prompts(tok, tpl)
    ids[1] = _teacher_prompts(tok, tpl)[1]  # different lengths in the two caches
    kw = dict(max_new_tokens=30, stop_ids=stop_ids(tok), temperature=0)
    guided = sample(model, tok, ids, guide=Guide(model, t_ids, make_rule("none")), **kw)
    assert guided.texts == sample(model, tok, t_ids, **kw).texts
    tr = sample(model, tok, ids, guide=Guide(model, t_ids, make_rule("trust-region")),
                **{**kw, "temperature": 1.0, "seed": 1})
    assert torch.isfinite(tr.logprobs).all() and tr.n_tokens > 0
