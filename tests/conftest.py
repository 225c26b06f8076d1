import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A very small model pretrained for a few seconds: too weak to solve much, but a real HF
    folder with the tokenizer and templates that every command uses."""
    from handrail.commands.pretrain import PretrainConfig, pretrain

    out = tmp_path_factory.mktemp("tiny") / "model"
    pretrain(PretrainConfig(out=str(out), max_steps=30, d_model=32, n_layers=2, n_heads=2,
                            n_problems=400, eval_n=16, batch_size=16), log=lambda *_: None)
    return str(out)
