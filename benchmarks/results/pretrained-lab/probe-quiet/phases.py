import time, torch
from handrail.commands.train import TrainConfig
from handrail.runtime.models import load_model
from handrail.runtime.evaluate import evaluate, fit_records, prompt_ids, prompt_limit
from handrail.data.datafile import load_records, shuffle_references
from handrail.engine.rollout import sample
from handrail.runtime.models import stop_ids
torch.set_num_threads(2)
model, tok, tpl = load_model("/tmp/wp2/warm-full/model")
recs = list(load_records("/tmp/wp2/test.jsonl"))[:64]
for hint in ("none", "solution", "answer"):
    t = time.time(); ids = prompt_ids(tok, recs, tpl, hint=hint)
    r = sample(model, tok, ids, max_new_tokens=64, stop_ids=stop_ids(tok), temperature=0)
    m = r.completion_mask
    print(hint, "prompt len mean %.0f max %d" % (sum(map(len, ids)) / len(ids), max(map(len, ids))),
          "completion mean %.1f, batch ran %d steps" % (m.sum(1).float().mean(), m.shape[1]), "%.1fs" % (time.time() - t))
    t = time.time(); from handrail.engine.rollout import _Stream, left_pad
    with torch.inference_mode(): _Stream(model, ids, tok.pad_token_id, "cpu", 64)
    print("   prefill alone %.1fs" % (time.time() - t))
