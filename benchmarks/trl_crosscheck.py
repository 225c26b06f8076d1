"""handrail beside TRL on the same base folder, task, prompts, verifier and held-out problems.

    pip install 'handrail[trl]'      # TRL 1.16
    python benchmarks/trl_crosscheck.py --out runs/trl-target --seeds 0,1,2 --rollouts 1024 --only sdft-target
    python benchmarks/trl_crosscheck.py --out runs/trl --seeds 0,1,2 --rollouts 1024 [--timing-pairs 2] [--process shared]

For each seed, four trainings run one after another, each in a fresh process by default
(`--process each`: each library as it ships, on the same threads, interleaved so both meet the
same machine state), or all in this one (`--process shared`: once handrail has trained, TRL runs
on the allocator settings handrail sets for itself, handrail/runtime/cpu.py, so the ratio compares the
two libraries' step code alone):

- GRPO at identical settings: TRL `GRPOTrainer` and handrail `--method grpo` (prompts x G,
  temperature, completion length, beta 0, the loss variant, learning rate, constant schedule);
- self-distillation at equal rollouts: TRL's experimental `SDFTTrainer` (frozen initial teacher,
  full-vocabulary forward KL, one completion per prompt) and handrail `--method self-distill`
  with its defaults (the aggregation rule and the divergence gate).

Neither library recomputes activations in backward (TRL's configs default to
`gradient_checkpointing=True`, which is set off here: equal work). The teacher prompt is handrail's own for both (TRL's template is set so the text is identical).
Every trained model is saved as a folder and evaluated by handrail's evaluation (what
`handrail eval` runs) on the same held-out problems, greedy. Step time is the wall time of the
optimiser steps alone (sampling, teacher pass, loss, update), evaluation excluded, for both.
A shared machine's speed drifts (by ±20% between runs of a few seconds, measured), so
`--timing-pairs N` times N more handrail/TRL pairs per seed, TRL first in every other pair, and
the ratio printed is the median over all pairs, with its range. Prints a table and writes
`results.json` under --out.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from handrail.data.records import student_prompt, teacher_prompt
from handrail.runtime.evaluate import evaluate, is_correct
from handrail.runtime.models import load_model
from handrail.commands.sources import default_base_model, environment
from handrail.commands.train import TrainConfig, task_and_records, train


def handrail_run(base: str, out: Path, seed: int, a, **kw) -> dict:
    cfg = TrainConfig(model=base, out=str(out), task=a.task, seed=seed, rollouts=a.rollouts, lr=a.lr,
                      max_new_tokens=a.max_new_tokens, temperature=1.0, eval_n=0, checkpoint_every=0,
                      threads=a.threads, **kw)
    summary = train(cfg, log=lambda *_: None)
    return {"folder": summary["model"], "steps": summary["step"], "train_seconds": summary["seconds"]}


class StepClock:
    """A transformers TrainerCallback (made on first use: transformers is imported lazily) timing
    optimiser steps only."""

    @staticmethod
    def make():
        from transformers import TrainerCallback

        class _Clock(TrainerCallback):
            def __init__(self):
                self.seconds, self.steps, self._t0 = 0.0, 0, None

            def on_step_begin(self, args, state, control, **kw):
                self._t0 = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                self.seconds += time.perf_counter() - self._t0
                self.steps += 1

        return _Clock()


def trl_dataset(records, tokenizer, templates, with_context: bool):
    from datasets import Dataset

    rows = []
    for i, r in enumerate(records):
        prompt = student_prompt(tokenizer, r, templates)
        row = {"prompt": prompt, "idx": i}
        if with_context:
            teacher = teacher_prompt(tokenizer, r, templates)
            if not teacher.startswith(prompt):
                sys.exit("trl_crosscheck: the teacher prompt does not begin with the student prompt; TRL's "
                         "template cannot reproduce it for this base")
            row["privileged_context"] = teacher[len(prompt):]
        rows.append(row)
    return Dataset.from_list(rows)


def trl_run(kind: str, base: str, out: Path, seed: int, a, task, records, tokenizer, templates) -> dict:
    from transformers import AutoModelForCausalLM

    common = dict(output_dir=str(out / "trainer"), learning_rate=a.lr, lr_scheduler_type="constant",
                  warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, max_steps=a.rollouts // 16,
                  max_completion_length=a.max_new_tokens, temperature=1.0, top_p=1.0, seed=seed,
                  report_to="none", save_strategy="no", logging_steps=10_000, use_cpu=True, bf16=False,
                  gradient_accumulation_steps=1, disable_dropout=True, gradient_checkpointing=False)
    model = AutoModelForCausalLM.from_pretrained(base)
    clock = StepClock.make()
    if kind == "grpo":
        from trl import GRPOConfig, GRPOTrainer

        def reward(completions, idx, **_):
            return [float(is_correct(c, records[i], task)) for c, i in zip(completions, idx)]

        args = GRPOConfig(per_device_train_batch_size=16, num_generations=a.group_size, beta=0.0,
                          loss_type="dapo", scale_rewards="group", num_iterations=1, **common)
        trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, processing_class=tokenizer,
                              train_dataset=trl_dataset(records, tokenizer, templates, False), callbacks=[clock])
    else:
        from trl.experimental.sdft import SDFTConfig, SDFTTrainer

        args = SDFTConfig(per_device_train_batch_size=16, num_generations=1, teacher_model_kind="base",
                          teacher_prompt_template="{prompt}{privileged_context}", distillation_alpha=0.0,
                          distillation_mode="full_logits", **common)
        extra = {}
        if kind == "sdft-target":  # TRL's trainer, handrail's target (rule and gate at handrail's defaults)
            from handrail.commands.trl_target import HandrailSDFTTrainer as SDFTTrainer

            extra = dict(rule="trust-region", gate="divergence")
        trainer = SDFTTrainer(model=model, args=args, processing_class=tokenizer,
                              train_dataset=trl_dataset(records, tokenizer, templates, True), callbacks=[clock],
                              **extra)
    trainer.train()
    folder = out / "model"
    trainer.model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "handrail.json").write_text((Path(base) / "handrail.json").read_text())  # the same templates
    return {"folder": str(folder), "steps": clock.steps, "train_seconds": clock.seconds}


def train_here(lib: str, name: str, base: str, dest: Path, seed: int, a) -> dict:
    if lib == "handrail":
        kw = (dict(method="grpo", prompts_per_step=16 // a.group_size, samples_per_prompt=a.group_size)
              if name == "grpo" else dict(method="self-distill", prompts_per_step=16))
        return handrail_run(base, dest, seed, a, **kw)
    task, records, _ = task_and_records(TrainConfig(model=base, task=a.task, seed=seed))  # handrail's for this seed
    _, tokenizer, templates = load_model(base)
    return trl_run(name, base, dest, seed, a, task, records, tokenizer, templates)


def one_training(lib: str, name: str, base: str, dest: Path, seed: int, a) -> dict:
    """One library's training: in a fresh process (`--process each`: each library as it ships, on
    glibc's allocator settings or the ones handrail sets for itself, handrail/runtime/cpu.py), or in this one
    (`shared`: once handrail has trained here, TRL runs on handrail's allocator settings too)."""
    if a.process == "shared":
        return train_here(lib, name, base, dest, seed, a)
    args = [sys.executable, __file__, "--worker", lib, "--kind", name, "--worker-seed", str(seed),
            "--out", str(dest), "--base", base, "--task", a.task, "--rollouts", str(a.rollouts), "--lr", str(a.lr),
            "--group-size", str(a.group_size), "--max-new-tokens", str(a.max_new_tokens),
            "--threads", str(a.threads)]
    done = subprocess.run(args, stdout=subprocess.PIPE, text=True)
    if done.returncode:
        sys.exit(f"trl_crosscheck: the {lib} {name} training (seed {seed}) failed with exit status {done.returncode}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def held_out(folder: str, records, task, a) -> float:
    lm, tok, templates = load_model(folder)
    return evaluate(lm, tok, templates, records, task=task, max_new_tokens=a.max_new_tokens)["accuracy"]


def ms(xs):
    return f"{statistics.mean(xs):.1%} ± {statistics.pstdev(xs):.1%}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", help="base model folder (default: the cached embedded default, built if missing)")
    ap.add_argument("--task", default="chain")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--rollouts", type=int, default=1024, help="sampled completions per training (16 per step)")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--group-size", type=int, default=4, help="GRPO's G (16 completions per step in all)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--eval-n", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", default="grpo,sdft", help="grpo, sdft, sdft-target (TRL's trainer with handrail's "
                    "target: handrail.commands.trl_target), comma-separated")
    ap.add_argument("--timing-pairs", type=int, default=0,
                    help="per seed and method, this many more handrail/TRL pairs timed (not evaluated), in "
                         "alternating order; the time ratio is the median over all pairs")
    ap.add_argument("--process", choices=("each", "shared"), default="each",
                    help="each: every training in a fresh process, each library as it ships (default); shared: "
                         "all in this one, so TRL also runs on the allocator settings handrail sets (handrail/runtime/cpu.py)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--worker", choices=("handrail", "trl"), help=argparse.SUPPRESS)  # one training, for --process each
    ap.add_argument("--kind", choices=("grpo", "sdft", "sdft-target"), help=argparse.SUPPRESS)
    ap.add_argument("--worker-seed", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    try:
        import trl
    except ImportError:
        sys.exit("trl_crosscheck: TRL is not installed; pip install 'trl==1.16.*'")
    torch.set_num_threads(a.threads)
    if a.worker:
        r = train_here(a.worker, a.kind, a.base, Path(a.out), a.worker_seed, a)
        print(json.dumps(r))
        return
    base = a.base or str(default_base_model())
    out = Path(a.out)
    task, _, eval_recs = task_and_records(TrainConfig(model=base, task=a.task, eval_n=a.eval_n))
    base_acc = held_out(base, eval_recs, task, a)
    print(f"base {base}: held-out greedy pass@1 {base_acc:.1%} (n={len(eval_recs)}); TRL {trl.__version__}")
    pairs = {"grpo": ("handrail grpo", "TRL GRPOTrainer"), "sdft": ("handrail self-distill", "TRL SDFTTrainer"),
             "sdft-target": ("handrail self-distill", "TRL SDFTTrainer, handrail's target")}
    results = {name: {"handrail": [], "trl": [], "pairs": []} for name in a.only.split(",")}
    for seed in map(int, a.seeds.split(",")):
        for name in results:
            for rep in range(1 + a.timing_pairs):
                # the two libraries alternate, and every other pair TRL goes first (A B B A), so a slow
                # drift in the machine's speed hits both alike
                order = ("handrail", "trl") if rep % 2 == 0 else ("trl", "handrail")
                runs = {}
                for lib in order:
                    dest = out / f"{name}-{lib}-s{seed}" if rep == 0 else out / f"timing-{name}-{lib}-s{seed}-{rep}"
                    runs[lib] = one_training(lib, name, base, dest, seed, a)
                    runs[lib]["step_seconds"] = runs[lib]["train_seconds"] / max(runs[lib]["steps"], 1)
                results[name]["pairs"].append({"seed": seed, "order": list(order),
                                               **{lib: runs[lib]["step_seconds"] for lib in order}})
                if rep:  # a repeat is for its time only: the same seed trains the same weights
                    shutil.rmtree(out / f"timing-{name}-handrail-s{seed}-{rep}", ignore_errors=True)
                    shutil.rmtree(out / f"timing-{name}-trl-s{seed}-{rep}", ignore_errors=True)
                    print(f"[{name} seed {seed}] timing pair {rep}: handrail {runs['handrail']['step_seconds']:.3f}, "
                          f"TRL {runs['trl']['step_seconds']:.3f} s/step", flush=True)
                    continue
                for lib, r in runs.items():
                    r["seed"], r["accuracy"] = seed, held_out(r["folder"], eval_recs, task, a)
                    r["folder"] = str(Path(r["folder"]).relative_to(out))
                    results[name][lib].append(r)
                    print(f"[{name} seed {seed}] {pairs[name][0 if lib == 'handrail' else 1]}: {r['accuracy']:.1%}, "
                          f"{r['step_seconds']:.3f} s/step over {r['steps']} steps", flush=True)
    lines = [f"base {base_acc:.1%}; {a.rollouts} rollouts, lr {a.lr:g}, seeds {a.seeds}; held-out greedy pass@1, "
             f"n={len(eval_recs)}; time ratio: median over {1 + a.timing_pairs} timed pair(s) per seed, [range]; "
             f"process: {a.process}",
             "", "| | handrail | TRL | TRL s/step ÷ handrail s/step |", "|---|---|---|---|"]
    for name, r in results.items():
        ratio = [p["trl"] / p["handrail"] for p in r["pairs"]]
        lines.append(f"| {pairs[name][0]} vs {pairs[name][1]} | {ms([x['accuracy'] for x in r['handrail']])} | "
                     f"{ms([x['accuracy'] for x in r['trl']])} | {statistics.median(ratio):.2f} "
                     f"[{min(ratio):.2f}–{max(ratio):.2f}] |")
        r["time_ratio"] = ratio
    print("\n".join(lines))
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(
        {"args": vars(a), "base_accuracy": base_acc, "results": results, "table": lines,
         "trl_version": trl.__version__, "environment": environment(base)}, indent=1))


if __name__ == "__main__":
    main()
