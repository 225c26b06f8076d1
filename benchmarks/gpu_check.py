"""The GPU check: handrail's device code paths checked for correctness, then timed, in one command.

    python benchmarks/gpu_check.py --out /tmp/gpu                 # on a GPU: real shapes (budget: 8 minutes)
    python benchmarks/gpu_check.py --small --out /tmp/gpu-small   # the same code on the CPU, small shapes

It needs only torch, transformers, accelerate and peft beside handrail (not datasets, pyarrow,
matplotlib or gguf), so it runs on a bare GPU image; tests/test_gpu_check.py runs `--small` with
those others made unimportable, so the check cannot rot.

Correctness, each against a stated tolerance (the table's `ok` column):
- `decoder`: the lean decoder (handrail/engine/decoder.py) against the model's own forward on a randomly
  initialised Qwen2 and Llama: greedy tokens equal and log-probs within 1e-4 in float32; in bf16
  the teacher-forced log-probs of the same sequences within 0.05 nats (bf16 keeps ~3 digits), and
  the share of equal greedy tokens reported.
- `fused loss`: the fused distillation loss against the naive one (value and gradient, float32),
  with the full teacher and with a top-k teacher.
- `lora`: the base with the adapter off (the LoRA teacher) gives the base model's logits while the
  adapter on changes them.
- `methods bf16`: one training step of every method under `mixed_precision=bf16`, finite loss.
- `two processes`: with two GPUs or more, DDP and FSDP2 (`fsdp=true`) launched by torchrun over
  nccl, each against one process's loss; skipped (and said so) with one GPU.

Figures, on randomly initialised models of real shapes (configs/models/qwen2.5-*.json, V=151,936;
no download): rollout tokens/s (lean decoder, the model's forward, `model.generate`), seconds
per step and peak GPU memory of self-distillation and GRPO (full fine-tuning, LoRA, top-k
teacher), and the distillation loss's peak memory at T=4096 (naive against fused). `--small`
uses a two-layer model of the same family, short sequences and a small vocabulary instead.
Prints a table and writes `gpu_check.json` into `--out`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=512, max_position_embeddings=512, bos_token_id=1, eos_token_id=2)


class IdTokenizer:
    """Token ids as text: what the sampler needs to decode a random model's tokens."""
    pad_token_id, eos_token_id = 0, 1

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def config(name: str, small: bool):
    from transformers import AutoConfig, LlamaConfig

    if name == "llama":
        base = dict(SMALL) if small else dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                              num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                              max_position_embeddings=8192)
        return LlamaConfig(**base, tie_word_embeddings=True, attn_implementation="sdpa")
    raw = json.loads((ROOT / "configs" / "models" / f"{name}.json").read_text())
    if small:
        raw.update(SMALL)
    raw.pop("architectures", None)
    cfg = AutoConfig.for_model(raw.pop("model_type"), **raw)
    cfg._attn_implementation = "sdpa"
    return cfg


def random_model(cfg, device, dtype, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def prompts(vocab: int, rows: int, longest: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, vocab, (max(2, longest - 3 * i),), generator=g).tolist() for i in range(rows)]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


# -- correctness ---------------------------------------------------------------------------------
def check_decoder(arch: str, device, small: bool) -> list[dict]:
    import handrail.engine.rollout as rollout
    from handrail.engine.decoder import hidden_states, positions, supported
    from handrail.engine.rollout import left_pad, sample

    out = []
    cfg = config(arch, small or device.type == "cpu")
    rows, new = (3, 8) if small else (8, 32)
    ids = prompts(cfg.vocab_size, rows, 12 if small else 64)
    for dtype in (torch.float32, torch.bfloat16):
        model = random_model(cfg, device, dtype)
        assert supported(model), f"{arch}: the lean decoder does not take this model"
        got = {}
        for lean in (True, False):
            rollout.decoder.LEAN = lean
            got[lean] = sample(model, IdTokenizer(), ids, max_new_tokens=new, stop_ids=[-1], temperature=0)
        rollout.decoder.LEAN = True
        a, b = got[True], got[False]
        same = (a.completion_ids == b.completion_ids).float().mean().item()
        if dtype == torch.float32:
            diff = (a.logprobs - b.logprobs).abs().max().item()
            out.append({"check": f"decoder {arch} fp32", "measured": f"tokens equal {same:.0%}, logp diff {diff:.1e}",
                        "tolerance": "tokens 100%, 1e-4", "ok": same == 1.0 and diff <= 1e-4})
        else:  # the same sequences, teacher-forced: the lean encoding against the model's forward
            seqs = [p + c for p, c in zip(ids, a.completion_ids.tolist())]
            x, attn = left_pad(seqs, 0)
            x, attn = x.to(device), attn.to(device)
            pos = positions(attn)
            T = x.shape[1]
            with torch.no_grad():
                h = hidden_states(model, x, attn, pos, (T - new - 1, new))
                lean = torch.log_softmax(model.lm_head(h).float(), -1)
                ref = torch.log_softmax(model(input_ids=x, attention_mask=attn, position_ids=pos)
                                        .logits[:, T - new - 1:T - 1].float(), -1)
            tok = x[:, T - new:].unsqueeze(-1)
            diff = (lean.gather(-1, tok) - ref.gather(-1, tok)).abs().max().item()
            out.append({"check": f"decoder {arch} bf16", "measured": f"logp diff {diff:.3f}, greedy tokens equal {same:.0%}",
                        "tolerance": "0.05 nats", "ok": diff <= 0.05})
        del model
    return out


def check_loss(device, small: bool) -> list[dict]:
    from handrail.engine.objectives import distill_chunk, fused_distill_sum, naive_sum
    from handrail.engine.targets import make_rule

    B, T, H, V = (2, 24, 16, 96) if small else (2, 256, 896, 151936)
    g = torch.Generator(device="cpu").manual_seed(0)
    head = torch.nn.Linear(H, V, bias=False).to(device)
    head_T = torch.nn.Linear(H, V, bias=False).to(device)
    hidden = torch.randn(B, T, H, generator=g).to(device)
    hidden_T = torch.randn(B, T, H, generator=g).to(device)
    mask = (torch.rand(B, T, generator=g) > 0.2).float().to(device)
    refs = ((hidden_T, head_T), (hidden + 0.3 * torch.randn(B, T, H, generator=g).to(device), head), None)
    out = []
    for k in (0, 16):
        runs = []
        for fused in (True, False):
            h = hidden.clone().requires_grad_(True)
            head.zero_grad()
            if fused:
                s = fused_distill_sum(make_rule("trust-region"), h, head, mask, None, refs=refs, chunk_size=64, topk=k)
            else:
                s = naive_sum(distill_chunk(make_rule("trust-region"), topk=k), h, head, mask, None, refs=refs)
            s[0].backward()
            runs.append((s[0].detach(), h.grad.clone(), head.weight.grad.clone()))
        (va, ga, wa), (vb, gb, wb) = runs
        rel = ((va - vb).abs() / vb.abs().clamp_min(1e-12)).item()
        gd = max((ga - gb).abs().max().item(), (wa - wb).abs().max().item())
        out.append({"check": f"fused loss {'top-' + str(k) + ' teacher' if k else 'full teacher'}",
                    "measured": f"value rel {rel:.1e}, grad diff {gd:.1e}", "tolerance": "1e-4, 1e-5",
                    "ok": rel <= 1e-4 and gd <= 1e-5 and bool(torch.isfinite(va))})
    return out


def check_lora(device, small: bool) -> list[dict]:
    from handrail.runtime.models import AdapterOff, add_lora

    cfg = config("qwen2.5-0.5b", True if small or device.type == "cpu" else False)
    base = random_model(cfg, device, torch.float32)
    x = torch.tensor(prompts(cfg.vocab_size, 1, 16)).to(device)
    with torch.no_grad():
        before = base(input_ids=x).logits.clone()
    lm = add_lora(base, 8, 16, "all-linear")
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)  # an adapter that has learnt something
        on = lm(input_ids=x).logits
    off = AdapterOff(lm)(input_ids=x).logits
    d_off, d_on = (off - before).abs().max().item(), (on - before).abs().max().item()
    return [{"check": "lora adapter-off teacher", "measured": f"off vs base {d_off:.1e}, on vs base {d_on:.1e}",
             "tolerance": "off <= 1e-5 < on", "ok": d_off <= 1e-5 < d_on}]


def tiny_folder(tmp: Path) -> str:
    """A small Llama with the lab's character tokenizer and templates, untrained: enough for one
    step of every method on the embedded task."""
    from handrail.data.records import TINY_TEMPLATES
    from handrail.runtime.models import build_char_tokenizer, build_tiny_model, save_model
    from handrail.data.tasks import get_task

    task = get_task("chain")
    texts = [p.prompt + p.solution for p in task.split("train", 200, None)] + ["[]\n#### -+*=0123456789"]
    tok = build_char_tokenizer(texts)
    return str(save_model(build_tiny_model(len(tok), d_model=32, n_layers=2, n_heads=2), tok, tmp / "tiny", TINY_TEMPLATES))


def train_once(model: str, out: Path, **keys) -> dict:
    from handrail.commands.train import TrainConfig, train

    cfg = TrainConfig(model=model, out=str(out), eval_n=0, checkpoint_every=0, **keys)
    cfg.rollouts = keys.get("rollouts") or cfg.rollouts_per_step
    with contextlib.redirect_stderr(open(os.devnull, "w")), contextlib.redirect_stdout(open(os.devnull, "w")):
        train(cfg)
    return json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])


def check_methods(device, tmp: Path) -> list[dict]:
    from handrail.methods import METHODS

    model, out = tiny_folder(tmp), []
    for name in METHODS:
        row = train_once(model, tmp / f"m-{name}", method=name, mixed_precision="bf16", prompts_per_step=4,
                         samples_per_prompt=2, max_new_tokens=16, threads=2)
        loss = row.get("loss/total", float("nan"))
        out.append({"check": f"methods bf16: {name}", "measured": f"loss {loss:.4g}", "tolerance": "finite",
                    "ok": math.isfinite(loss)})
    return out


def check_two_processes(device, tmp: Path) -> list[dict]:
    """DDP and FSDP2 over nccl, where the machine has two GPUs: two processes train the tiny model
    to the same loss as one (what the CPU tests check over gloo)."""
    import subprocess

    if device.type != "cuda" or torch.cuda.device_count() < 2:
        return [{"check": "two processes (DDP, FSDP2)", "measured": f"skipped: {torch.cuda.device_count()} GPU(s)",
                 "tolerance": "-", "ok": True, "skipped": True}]
    model, out = tiny_folder(tmp), []
    keys = ["--rollouts", "16", "prompts_per_step=8", "max_new_tokens=16", "eval_n=0", "checkpoint_every=0"]
    one = train_once(model, tmp / "p1", rollouts=16, prompts_per_step=8, max_new_tokens=16)
    for label, extra in (("DDP", []), ("FSDP2", ["fsdp=true", "mixed_precision=bf16"])):
        run = tmp / f"p2-{label}"
        p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "handrail.cli",
                            "train", "--model", model, "--out", str(run), *keys, *extra], capture_output=True, text=True)
        row = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1]) if p.returncode == 0 else {}
        loss = row.get("loss/total", float("nan"))
        exact = label == "DDP"  # bf16 sharding rounds differently from one fp32 process
        close = math.isclose(loss, one["loss/total"], rel_tol=1e-3 if exact else 5e-2, abs_tol=1e-6)
        out.append({"check": f"two processes {label} (nccl)", "measured": f"rc {p.returncode}, loss {loss:.4g} vs one {one['loss/total']:.4g}",
                    "tolerance": "1e-3 rel" if exact else "5e-2 rel (bf16)", "ok": p.returncode == 0 and close})
    return out


# -- figures -------------------------------------------------------------------------------------
def figure_rollout(arch: str, device, small: bool, dtype) -> list[dict]:
    import handrail.engine.rollout as rollout
    from handrail.engine.rollout import left_pad, sample

    cfg = config(arch, small)
    model = random_model(cfg, device, dtype)
    rows, new = (2, 8) if small else (32, 128)
    ids = prompts(cfg.vocab_size, rows, 16 if small else 128)
    x, attn = left_pad(ids, 0)
    x, attn = x.to(device), attn.to(device)

    def ours(lean):
        rollout.decoder.LEAN = lean
        sample(model, IdTokenizer(), ids, max_new_tokens=new, stop_ids=[-1], temperature=1.0, seed=0)

    def hf():
        with torch.no_grad():
            model.generate(input_ids=x, attention_mask=attn, max_new_tokens=new, min_new_tokens=new, do_sample=True,
                           top_k=0, pad_token_id=0)

    out = []
    for label, fn in (("lean decoder", lambda: ours(True)), ("model forward", lambda: ours(False)), ("generate", hf)):
        fn()  # warm-up
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        out.append({"figure": f"rollout {arch} {label}", "value": round(rows * new / (time.perf_counter() - t)),
                    "unit": f"tokens/s (batch {rows}, {new} new)"})
    rollout.decoder.LEAN = True
    del model
    return out


def vocab_tokenizer(size: int):
    """The lab's characters, then other code points until there is one character per model id: a
    random model's every token decodes, and the lab's prompts tokenise as they do for its base."""
    from handrail.runtime.models import SPECIALS, build_char_tokenizer

    lab = sorted(set("0123456789+-*=#\n[] "))
    room = size - len(SPECIALS) - len(lab)
    filler, c = [], 0x4E00
    while len(filler) < room:
        if not 0xD800 <= c <= 0xDFFF and not 0xFDD0 <= c <= 0xFDEF and (c & 0xFFFE) != 0xFFFE:
            filler.append(chr(c))
        c += 1
    return build_char_tokenizer(["".join(lab), "".join(filler)])


def figure_steps(arch: str, device, small: bool, tmp: Path) -> list[dict]:
    from handrail.data.records import TINY_TEMPLATES
    from handrail.runtime.models import save_model

    cfg = config(arch, small)
    model = random_model(cfg, device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    tok = vocab_tokenizer(cfg.vocab_size)
    folder = save_model(model, tok, tmp / f"rand-{arch}", TINY_TEMPLATES)
    del model
    per = dict(prompts_per_step=2, samples_per_prompt=2, max_new_tokens=8) if small else \
        dict(prompts_per_step=8, samples_per_prompt=4, max_new_tokens=128)
    out = []
    for method in ("self-distill", "grpo"):
        for variant, keys in (("full", {}), ("lora r=16", {"lora_r": 16}), ("top-64 teacher", {"teacher_topk": 64})):
            if variant.startswith("top") and method != "self-distill":
                continue
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            steps = 2
            row = train_once(str(folder), tmp / f"s-{arch}-{method}-{variant}".replace(" ", "_").replace("=", ""),
                             method=method, mixed_precision="bf16" if device.type == "cuda" else "no",
                             rollouts=steps * per["prompts_per_step"] * per["samples_per_prompt"], **per, **keys)
            peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
            out.append({"figure": f"step {arch} {method} {variant}", "value": row["time/step_s"],
                        "unit": "s/step (the 2nd)", "peak_gib": None if peak is None else round(peak, 2)})
    return out


def figure_loss_memory(device, small: bool) -> list[dict]:
    from handrail.engine.objectives import distill_chunk, fused_distill_sum, naive_sum
    from handrail.engine.targets import make_rule

    T, H, V = (64, 16, 512) if small else (4096, 896, 151936)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    head, head_T = (torch.nn.Linear(H, V, bias=False).to(device, dtype) for _ in range(2))
    hidden = torch.randn(1, T, H, device=device, dtype=dtype)
    refs = ((torch.randn(1, T, H, device=device, dtype=dtype), head_T), None, None)
    mask = torch.ones(1, T, device=device)
    out = []
    for label in ("naive", "fused"):
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            start = torch.cuda.memory_allocated()
        h = hidden.clone().requires_grad_(True)
        sync(device)
        t = time.perf_counter()
        if label == "fused":
            s = fused_distill_sum(make_rule("trust-region"), h, head, mask, None, refs=refs)
        else:
            s = naive_sum(distill_chunk(make_rule("trust-region")), h, head, mask, None, refs=refs)
        s[0].backward()
        sync(device)
        peak = (torch.cuda.max_memory_allocated() - start) / 2**30 if device.type == "cuda" else None
        out.append({"figure": f"loss T={T} {label}", "value": round(time.perf_counter() - t, 3), "unit": "s (fwd+bwd)",
                    "peak_gib": None if peak is None else round(peak, 2)})
        del s, h
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="small shapes (the CPU form the tests run)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--models", default="qwen2.5-0.5b,qwen2.5-1.5b", help="for the figures")
    ap.add_argument("--no-figures", action="store_true")
    a = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HANDRAIL_NO_BAR", "1")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({torch.backends.cpu.get_cpu_capability()})"
    checks, figures, t0 = [], [], time.time()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sections = [lambda: check_decoder("qwen2.5-0.5b", device, a.small), lambda: check_decoder("llama", device, a.small),
                    lambda: check_loss(device, a.small), lambda: check_lora(device, a.small),
                    lambda: check_methods(device, tmp), lambda: check_two_processes(device, tmp)]
        for run in sections:
            try:
                checks += run()
            except Exception as e:  # one failing check is a row, not the end of the check
                checks.append({"check": getattr(run, "__name__", "?"), "measured": f"{type(e).__name__}: {e}"[:200],
                               "tolerance": "runs", "ok": False})
            print(f"[{time.time() - t0:5.0f} s] {checks[-1]['check']}: {'ok' if checks[-1]['ok'] else 'FAILED'}", flush=True)
        if not a.no_figures:
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
            for arch in a.models.split(","):
                for part in (lambda: figure_rollout(arch, device, a.small, dtype), lambda: figure_steps(arch, device, a.small, tmp)):
                    try:
                        figures += part()
                    except Exception as e:
                        figures.append({"figure": f"{arch}: failed", "value": None, "unit": f"{type(e).__name__}: {e}"[:200]})
                    print(f"[{time.time() - t0:5.0f} s] {figures[-1]['figure']}", flush=True)
            try:
                figures += figure_loss_memory(device, a.small)
            except Exception as e:
                figures.append({"figure": "loss memory: failed", "value": None, "unit": f"{type(e).__name__}: {e}"[:200]})
    print(f"\ndevice: {name}; torch {torch.__version__}; {'small shapes' if a.small else 'real shapes'}; "
          f"{time.time() - t0:.0f} s")
    print(f"{'check':<34} {'ok':<4} {'measured':<46} tolerance")
    for c in checks:
        ok = "skip" if c.get("skipped") else "yes" if c["ok"] else "NO"
        print(f"{c['check']:<34} {ok:<4} {c['measured']:<46} {c['tolerance']}")
    if figures:
        print(f"\n{'figure':<44} {'value':>10}  unit / peak GPU GiB")
        for f in figures:
            print(f"{f['figure']:<44} {str(f['value']):>10}  {f['unit']}"
                  + (f" / {f['peak_gib']}" if f.get("peak_gib") is not None else ""))
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "gpu_check.json").write_text(json.dumps(
        {"device": name, "torch": torch.__version__, "small": a.small, "seconds": round(time.time() - t0, 1),
         "checks": checks, "figures": figures}, indent=1) + "\n")
    return 0 if all(c["ok"] for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
