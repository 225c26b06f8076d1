"""`handrail train`: the one training loop, for every method.

    once, for answer-only records: bootstrap worked solutions (bootstrap.py; counts in the budget)
    for each step:
        sample prompts            (the same global draw on every process; each takes its slice)
        roll out                  (student completions g ~ pi(.|P_S), KV-cached, no grad; or
                                   guided by the teacher; or the turns of logged conversations)
        score                     (a typed signal: teacher hidden states on [P_T, g] / advantages; no grad)
        loss                      (a per-token signal on completion tokens, chunked over T)
        step                      (backward, clip, optimizer, EMA teacher)
        log / eval / checkpoint

Methods differ only in `score` and the chunk loss they compute from its signal (handrail/methods/, one file each).
`step()` is one pass of the loop above; around it, `train()` only assembles its parts: the budget
(budget.py: what a step costs), the parallel strategy (parallel.py: one process, DDP or FSDP2),
and the checkpoints (checkpoint.py: written whole or not at all, resumed exactly).
With `lora_r`, the policy is the base with peft adapters and the base with the adapter off is
the initial model (teacher, reference): no second copy of the weights.
Losses are sums over tokens divided by the *global* token count, so N processes at a global
batch of B reproduce one process at B.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import math
import os
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from handrail.errors import UsageError
from handrail import config as C
from handrail.engine import decoder
from handrail.commands.bootstrap import FILE as BOOTSTRAP_FILE
from handrail.commands.bootstrap import bootstrap, needs_bootstrap
from handrail.commands.bootstrap import load as load_bootstrap
from handrail.commands.bootstrap import save as save_bootstrap
from handrail.engine.budget import Budget
from handrail.methods import with_options
from handrail.runtime.checkpoint import Checkpoints, NonFinite, State, check_finite
from handrail.runtime.cpu import keep_freed_memory
from handrail.data.records import records_from_task, reference_answer
from handrail.data.datafile import facts, load_records, shuffle_references
from handrail.runtime.evaluate import PromptIds, evaluate, fit_records, prompt_limit
from handrail.runtime.models import AdapterOff, HiddenStates, add_lora, load_model, save_model, stop_ids
from handrail.runtime.parallel import Parallel
from handrail.engine.rollout import sample
from handrail.engine.steps import delimiter_table, step_ends
from handrail.data.tasks import DEFAULT_TASK, get_task
from handrail.data.verifiers import FileTask
from handrail.commands.sources import model_folder
from handrail.folders import FolderLock, progress, writing


def _registry(module: str, name: str):
    """A registry read when a config is checked (lazily: the methods import this module)."""
    import importlib

    return getattr(importlib.import_module(f"handrail.{module}"), name)


@dataclass
class SharedConfig:
    """A training run's config: these keys, which every method reads (or that choose the method),
    and each method's own options, declared in its file (`Options` in handrail/methods/) and added
    by `with_options` below. All keys are flat: `delta=0.5`, `cfg.delta`."""

    model: str = ""  # HF folder / hub id / .gguf / 'smollm2'
    templates: str | None = None  # JSON file with "student" and "teacher" prompt templates (default: the model's own, else English)
    out: str = "runs/train"  # run folder: config.json, metrics.jsonl, checkpoint/, model/
    task: str | None = None  # embedded task (default: chain); ignored with `data`
    data: str | None = None  # JSONL / Parquet / datasets folder of training records
    eval_data: str | None = None  # held-out records for `data` runs (default: none)
    fields: str | None = None  # data: other field names, "prompt=question,solution=answer" (common layouts need none)
    verifier: str = "exact"  # data: how answers are checked: exact | math (math-verify) | module:function
    method: str = "self-distill"  # self-distill | grpo | sft | rlsd (grpo, the teacher sizing each token) | srpo (solved rollouts to grpo, failed to self-distill) | vine (grpo with Monte Carlo step values) | expert-iteration (step-level search, its visit counts distilled)
    hint: str = "solution"  # what the teacher sees: solution | answer | blank (the teacher's prompt with an empty reference: the no-reference control)
    shuffle_references: bool = False  # the shuffled-reference control: each training record shows the teacher another record's reference
    reference: str = "full"  # what training records carry: full (worked, the student's style) | terse (embedded tasks: intermediate results skipped) | answer (only the final answer)
    rollout: str = "student"  # student: g ~ pi(.|P_S) | guided: each token from A(p_S, p_T) | logged: the data's turns
    rollouts: int = 8192  # budget: sampled student completions, all processes together (benchmarks/HISTORY.md §2c)
    bootstrap_k: int = 4  # answer-only records: samples per problem in a bootstrap stage first (0: off; then the teacher sees the bare answer, which teaches guessing: BENCHMARKS.md §L3)
    bootstrap_rollouts: int = 0  # the bootstrap stage's share of `rollouts` (0: half of them)
    bootstrap_rollout: str = "student"  # bootstrap samples: student | guided (the teacher sees the answer)
    prompts_per_step: int = 16  # global prompts per step
    samples_per_prompt: int = 1  # completions per prompt (GRPO's group size G)
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    lr: float = 1e-4
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    step_delimiter: str = "\n"  # what ends a step (vine, search): a line break by default
    curriculum: str = "none"  # none | brevity: once validation accuracy stops rising, a slowly growing length pressure on correct completions (reward methods)
    brevity_step: float = 0.05  # brevity: pressure added per validation check (at eval_every)
    brevity_max: float = 0.5  # brevity: the most a correct completion's reward drops for using the whole max_new_tokens
    brevity_margin: float = 0.02  # brevity: accuracy may fall this far below its best before the pressure backs off
    brevity_patience: int = 1  # brevity: checks without a new best before shortening starts
    curriculum_n: int = 100  # embedded tasks: validation problems the curriculum watches (never test problems)
    curriculum_data: str | None = None  # data runs: the validation records the curriculum watches
    chunk_size: int = 128  # sequence positions per loss chunk
    level: int | None = None  # task difficulty to train and evaluate on (default: task's post level)
    train_n: int = 2000  # training problems drawn from the task
    eval_n: int = 200  # held-out problems (0: no evaluation)
    eval_split: str = "test"  # embedded tasks: test | validation (distinct from test: for choosing hyperparameters)
    eval_every: int = 8  # steps between evaluations (0: only at the start and end)
    eval_samples: int = 0  # sampled completions per eval problem, besides greedy
    checkpoint_every: int = 16  # steps between checkpoints (0: only at the end)
    seed: int = 0
    lora_r: int = 0  # LoRA rank (peft); 0 = full fine-tuning. The frozen teacher is then the base with the adapter off: no second copy
    lora_alpha: float = 16.0  # LoRA scale numerator (the update is scaled by alpha / r)
    lora_targets: str = "all-linear"  # modules that get adapters: all-linear, or names such as q_proj,v_proj
    lora_merge: bool = False  # also save the base with the adapter merged in, as model-merged/
    mixed_precision: str = "no"  # no | bf16 | fp16 (through accelerate)
    grad_checkpointing: bool = False  # recompute the student's layer activations in backward: less memory, more time
    fsdp: bool = False  # under torchrun: shard weights, gradients and optimizer state across processes (sharding.py)
    log_with: str | None = None  # accelerate tracker: tensorboard | wandb | ... (metrics.jsonl always)
    threads: int = 0  # torch threads per process (0 = leave as is)
    max_nonfinite: int = 3  # a non-finite loss or gradient skips the step; this many in a row stop the run
    truncate: str = "error"  # a prompt too long for the model's positions: error (naming the record) | left (keep its end)
    lean_decoder: bool = True  # sample, run the teacher's pass and the student's training forward through decoder.py where the model allows it (Llama/Qwen2 with sdpa, no hooks, plain weights; else the model's own forward): same tokens, about 2x the sampling speed on small models. false: the model's forward everywhere

    RANGES = {
        "rollouts": "[1, )", "bootstrap_k": "[0, )", "bootstrap_rollouts": "[0, )", "prompts_per_step": "[1, )",
        "samples_per_prompt": "[1, )", "max_new_tokens": "[1, )", "temperature": "[0, )", "top_p": "(0, 1]",
        "lr": "(0, )", "weight_decay": "[0, )", "grad_clip": "(0, )",
        "chunk_size": "[1, )", "level": "[1, )", "train_n": "[1, )", "eval_n": "[0, )", "eval_every": "[0, )",
        "eval_samples": "[0, )", "checkpoint_every": "[0, )", "threads": "[0, )", "max_nonfinite": "[1, )",
        "lora_r": "[0, )", "lora_alpha": "(0, )",
        "brevity_step": "(0, 1]", "brevity_max": "[0, 1]", "brevity_margin": "[0, 1]", "brevity_patience": "[0, )",
        "curriculum_n": "[1, )",
    }
    CHOICES = {
        "method": lambda: _registry("methods", "METHODS"),
        "rollout": ("student", "guided", "logged"), "bootstrap_rollout": ("student", "guided"),
        "hint": ("solution", "answer", "blank"), "reference": ("full", "terse", "answer"),
        "mixed_precision": ("no", "bf16", "fp16"), "truncate": ("error", "left"),
        "eval_split": ("test", "validation"), "curriculum": ("none", "brevity"),
    }

    def validate(self):
        """Rules that join several keys (ranges and choices: RANGES, CHOICES, checked by config.build)."""
        if not self.model:
            raise UsageError("config key 'model': required")
        from handrail.data.records import parse_fields
        from handrail.methods import METHODS
        from handrail.data.verifiers import load as load_verifier

        parse_fields(self.fields)
        load_verifier(self.verifier)
        if self.fsdp and self.lora_r:
            raise UsageError("config key 'fsdp': sharding LoRA adapters is not built (their base is frozen and "
                             "shared; data-parallel training without fsdp keeps one copy of it per process)")
        if self.fsdp and self.mixed_precision == "fp16":
            raise UsageError("config key 'fsdp': with fsdp use mixed_precision bf16 (fp16 would need a loss "
                             "scaler, which the sharded path does not have)")
        if self.lora_merge and not self.lora_r:
            raise UsageError("config key 'lora_merge': there is no adapter to merge (lora_r is 0)")

        METHODS[self.method].check(self)
        if self.bootstrap_k and self.bootstrap_rollouts >= self.rollouts:
            raise UsageError(f"config key 'bootstrap_rollouts': {self.bootstrap_rollouts} leaves nothing of "
                             f"the budget rollouts={self.rollouts} for training")
        if self.rollouts < self.rollouts_per_step:
            raise UsageError(f"config key 'rollouts': {self.rollouts} does not buy one step of "
                             f"prompts_per_step x samples_per_prompt"
                             + (" x (1 + vine_points x vine_k)" if METHODS[self.method].rollouts_per_sample(self) > 1 else "")
                             + f" = {self.rollouts_per_step} rollouts")
        if self.curriculum != "none":
            if not METHODS[self.method].rewarded:
                rewarded = ", ".join(name for name, m in METHODS.items() if m.rewarded)
                raise UsageError(f"config key 'curriculum': {self.curriculum} shapes a reward; method {self.method} "
                                 f"has none (use {rewarded})")
            if not self.eval_every:
                raise UsageError("config key 'eval_every': the curriculum checks validation accuracy every "
                                 "eval_every steps, so it must be > 0")
            if self.data and not self.curriculum_data:
                raise UsageError("config key 'curriculum_data': with --data the curriculum needs validation "
                                 "records of its own (never the test file)")
        if not self.step_delimiter:
            raise UsageError("config key 'step_delimiter': must not be empty")
        if self.shuffle_references and self.reference == "answer":
            raise UsageError("config key 'shuffle_references': answer-only records have no reference to shuffle "
                             "(their answers are what they are checked against)")
        if self.reference == "terse" and self.data:
            raise UsageError("config key 'reference': terse rewrites an embedded task's references; "
                             "with --data, give terse solutions in the file")

    def aggregation_rule(self):
        """`rule` with its own parameters bound: (logp_S, logp_T) -> log q (targets.py)."""
        from handrail.engine.targets import make_rule

        return make_rule(self.rule, lam=self.lam, delta=self.delta, lam_max=self.lam_max, top_p=self.support_top_p,
                         tau=self.tau)

    @property
    def rollouts_per_step(self) -> int:
        """Sampled completions per step: the rollouts, and for vine every continuation too."""
        from handrail.methods import METHODS

        return self.prompts_per_step * self.samples_per_prompt * METHODS[self.method].rollouts_per_sample(self)


TrainConfig = with_options(SharedConfig, "TrainConfig", __name__)


def _slice(n: int, rank: int, world: int) -> slice:
    if n % world:
        raise UsageError(f"global batch {n} is not divisible by {world} processes")
    per = n // world
    return slice(rank * per, (rank + 1) * per)


@dataclass
class Run:
    """What a training step reads, built once by `train` (or by a test, to take one step)."""

    cfg: TrainConfig
    acc: Any  # accelerate.Accelerator
    parallel: Parallel
    method: Any  # methods.Method
    tokenizer: Any
    records: Sequence  # the training records
    budget: Budget
    world: Any  # methods.World
    rows: slice  # this process's rows of each step's global batch
    stops: list[int]
    delimiters: Any  # steps.delimiter_table: where each rollout's steps end


def step(run: Run, state: State) -> dict:
    """One training step: sample prompts, roll out, score, loss, optimizer step. Advances `state`
    and returns the step's metrics row (evaluation, logging and checkpoints are the caller's)."""
    cfg, acc, method, tokenizer = run.cfg, run.acc, run.method, run.tokenizer
    t0 = time.time()
    # 1. sample prompts: one global draw (the same on every process); this process takes its rows
    rng = random.Random(f"{cfg.seed}/{state.step}")
    batch = [r for r in rng.sample(run.records, cfg.prompts_per_step) for _ in range(cfg.samples_per_prompt)]
    local = batch[run.rows]

    # 2. roll out the student (or take text already written: references, logged turns)
    lm_now = run.parallel.lm()
    lm_now.eval()
    if run.budget.sampling:
        guide = method.guide(local, lm_now, state.step / run.budget.steps(state))
        rollout = sample(lm_now, tokenizer, method.prompts(local), max_new_tokens=cfg.max_new_tokens,
                         stop_ids=run.stops, temperature=cfg.temperature, top_p=cfg.top_p,
                         seed=cfg.seed * 100_003 + state.step, row_offset=run.rows.start,
                         global_rows=len(batch), guide=guide)
    else:
        rollout = method.given_rollout(local, acc.device, lm_now)
    lm_now.train()
    rollout.step_ends = step_ends(rollout.completion_ids, rollout.completion_mask, run.delimiters)

    # 3. score: the per-token signal, with no gradient
    signal = method.score(local, rollout, lm_now, run.world)

    # 4. loss on completion tokens, normalised by the global token count (N processes = one)
    n_tokens = run.world.total(torch.tensor(float(rollout.n_tokens), device=acc.device)).item()
    loss_sum, metrics = method.student_loss(run.parallel.policy, local, rollout, signal)  # in the wrapped forward
    acc.backward(loss_sum * acc.num_processes / max(n_tokens, 1.0))

    # 5. optimizer step, skipped when not finite (it would write NaN into every weight)
    grad_norm = run.parallel.clip(cfg.grad_clip)
    finite = bool(torch.isfinite(loss_sum.detach())) and math.isfinite(grad_norm)
    run.parallel.step(finite)
    if finite:
        method.after_step(run.parallel.lm())
        state.nonfinite_run = 0
    else:
        state.nonfinite_steps += 1
        state.nonfinite_run += 1
    if state.nonfinite_run >= cfg.max_nonfinite:
        raise NonFinite(f"{state.nonfinite_run} steps in a row had a non-finite loss or gradient (step "
                        f"{state.step + 1}; lr={cfg.lr:g}); stopped, and the last good checkpoint in {cfg.out} is kept")

    state.step += 1
    spent = method.spent  # a method whose cost varies (expert iteration's search) counts its own
    run.budget.spend(state, None if spent is None else
                     int(run.world.total(torch.tensor(float(spent), device=acc.device)).item()))
    state.tokens += int(n_tokens)
    sums = run.world.total(torch.stack([loss_sum.detach()] + [m.detach().float() for m in metrics.values()]))
    state.seconds += time.time() - t0
    return {"step": state.step, "rollouts": state.rollouts, "samples": run.budget.samples(state),
            "bootstrap_rollouts": state.bootstrap_rollouts, "tokens": state.tokens,
            "seconds": round(state.seconds, 2), "time/step_s": round(time.time() - t0, 3),
            "loss/total": sums[0].item() / max(n_tokens, 1.0), "loss/grad_norm": grad_norm,
            "nonfinite_steps": state.nonfinite_steps,
            "rollout/steps": sum(map(len, rollout.step_ends)) / max(1, len(rollout.step_ends)),
            **{k: v.item() / max(n_tokens, 1.0) for k, v in zip(metrics, sums[1:])},
            **method.step_metrics(signal)}


def train(cfg: TrainConfig, resume: bool = False, log=print) -> dict:
    """Train, evaluate and save as `cfg` says (resume: continue the run in cfg.out from its newest
    checkpoint). Returns the run's summary; the model is in cfg.out/model."""
    with contextlib.ExitStack() as held:  # the run folder's lock and the progress bar, for the run's lifetime
        return _train(cfg, resume, log, held)


def _starting_point(out: Path, checkpoints: Checkpoints, resume: bool):
    """(the checkpoint to resume from or None, whether a stopped run's folder starts again)."""
    ckpt = next(iter(checkpoints.complete()), None)
    if not resume and (out / "metrics.jsonl").exists() and (ckpt or (out / "model").exists()):
        raise UsageError(f"{out}: already holds a run (metrics.jsonl); continue it with --resume {out} "
                         f"or choose another --out")
    # a run stopped before its first checkpoint has nothing to continue from: it starts again
    restart = (out / "metrics.jsonl").exists() and ckpt is None
    return (ckpt if resume else None), restart


@dataclass
class _Checks:
    """The evaluations a run makes on its current weights: held-out pass@1 (main process) and the
    curriculum's validation check (every process, which each moves its copy of the curriculum by)."""

    cfg: Any
    acc: Any
    parallel: Parallel
    method: Any
    tokenizer: Any
    templates: dict
    task: Any
    eval_recs: list
    curriculum_recs: list

    def held_out(self) -> dict:
        if not self.acc.is_main_process:
            return {}
        res = evaluate(self.parallel.lm(), self.tokenizer, self.templates, self.eval_recs, task=self.task,
                       samples=self.cfg.eval_samples, max_new_tokens=self.cfg.max_new_tokens, seed=self.cfg.seed)
        return {"eval/pass@1": res["accuracy"], "eval/pass@1_lenient": res["accuracy_lenient"],
                "eval/pass@1_sampled": res["accuracy_sampled"], "eval/leak_rate": res["leak_rate"],
                "eval/tokens_per_solved": res["tokens_per_solved"], "eval/n": res["n"]}

    def curriculum(self) -> dict:
        res = evaluate(self.parallel.lm(), self.tokenizer, self.templates, self.curriculum_recs, task=self.task,
                       samples=0, max_new_tokens=self.cfg.max_new_tokens)
        self.method.curriculum.update(res["accuracy"])
        return {"curriculum/val_pass@1": res["accuracy"],
                "curriculum/val_tokens_per_solved": res["tokens_per_solved"], "curriculum/alpha": self.method.curriculum.alpha}


def _claim_folder(cfg, out: Path, held, checkpoints, resumed_at: int | None, restart: bool, log) -> None:
    """The run folder, locked and made consistent with the state the run starts from (main process)."""
    held.enter_context(FolderLock(out))  # a second run on this folder stops here, having written nothing
    if resumed_at is not None:  # rows past the checkpoint are redone; only the lock's holder may cut them
        checkpoints.truncate_metrics(resumed_at)
    if restart:
        log(f"{out}: the run there stopped before its first checkpoint; starting it again from step 0")
        for name in ("metrics.jsonl", BOOTSTRAP_FILE):
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    with writing(out / "config.json"):
        C.save(cfg, out / "config.json")


def _save_final(cfg, lm, tokenizer, templates, meta, out: Path) -> None:
    """The trained model in out/model (and merged, with lora_merge), refused if a weight is not finite."""
    check_finite(lm, out)
    with writing(out / "model", partial=out / "model"):  # the checkpoint (written at the last step) stays
        save_model(lm, tokenizer, out / "model", templates, meta)
    if cfg.lora_merge:
        with writing(out / "model-merged", partial=out / "model-merged"):
            save_model(lm.merge_and_unload(), tokenizer, out / "model-merged", templates)


def _train(cfg: TrainConfig, resume: bool, log, held: contextlib.ExitStack) -> dict:
    from handrail.methods import METHODS, World

    acc = _accelerator(cfg)
    held.enter_context(decoder.lean(cfg.lean_decoder and decoder.LEAN))  # the environment's 0 wins
    out = Path(cfg.out)
    checkpoints = Checkpoints(out, acc.is_main_process, acc.wait_for_everyone)
    ckpt, restart = _starting_point(out, checkpoints, resume)

    # -- records, model, method (before anything is written: a model that fails to load leaves no run)
    task, train_recs, eval_recs = task_and_records(cfg)
    curriculum_recs = _curriculum_records(cfg, task)
    _resolve_logged(cfg, train_recs, log)
    check = task or FileTask(cfg.verifier)  # what verifies an answer and spots a leak
    model = model_folder(cfg.model)  # 'default': the embedded base, built on first use
    initial, tokenizer, templates = load_model(model, device=acc.device, templates=cfg.templates)
    limit = prompt_limit(initial, cfg.max_new_tokens)
    hints = ("none", cfg.hint) if METHODS[cfg.method].privileged else ("none",)
    prompts = PromptIds(tokenizer, templates)  # each record tokenized once, here, for the whole run
    train_recs = fit_records(tokenizer, train_recs, templates, limit, cfg.truncate, hints, prompts)
    if cfg.counterfactual == "auto":  # resolved once, so config.json (and --resume) says what ran
        cfg = replace(cfg, counterfactual=resolve_counterfactual(cfg, initial, tokenizer, templates, train_recs,
                                                                 check, log))
    eval_recs = fit_records(tokenizer, eval_recs, templates, limit, cfg.truncate, ("none",))
    curriculum_recs = fit_records(tokenizer, curriculum_recs, templates, limit, cfg.truncate, ("none",))
    lm, initial, meta = _policy_model(cfg, initial, model, copy_initial=ckpt is not None)
    policy = HiddenStates(lm).train()
    method = METHODS[cfg.method](cfg, initial, tokenizer, templates, check, prompts)  # copies what it keeps
    state, opt_state = (checkpoints.load(lm, method, acc.device, log) if ckpt else (State(), None))
    parallel = Parallel(acc, policy, cfg, opt_state, log)

    acc.wait_for_everyone()  # every process has checked before the main one writes
    if acc.is_main_process:
        _claim_folder(cfg, out, held, checkpoints, state.step if ckpt else None, restart, log)
    parallel.prepare()
    if cfg.log_with:
        acc.init_trackers(out.name, config=asdict(cfg))

    checks = _Checks(cfg, acc, parallel, method, tokenizer, templates, check, eval_recs, curriculum_recs)
    if state.step == 0 and eval_recs:
        _log(acc, out, {"step": 0, "rollouts": 0, "samples": 0, "tokens": 0, "seconds": 0.0, **checks.held_out()})

    # 0. answer-only records: sample worked solutions first and keep those that verify (bootstrap.py)
    answer_only = needs_bootstrap(train_recs) if method.needs_solutions else []
    if answer_only and cfg.bootstrap_k:
        train_recs = _bootstrap_stage(cfg, acc, out, state, parallel.lm(), tokenizer, templates,
                                      train_recs, check, log)
    elif answer_only and cfg.hint == "solution":
        log(f"{len(answer_only)} records have only an answer: '#### <answer>' stands in for their solution "
            f"(bootstrap_k=0; a teacher shown a bare answer can teach the student to guess)")
    if len(train_recs) < cfg.prompts_per_step:
        raise UsageError(f"{len(train_recs)} training records, fewer than prompts_per_step="
                         f"{cfg.prompts_per_step}; lower prompts_per_step or add records")

    budget = Budget.of(cfg, method)
    run = Run(cfg, acc, parallel, method, tokenizer, train_recs, budget,
              World(acc.process_index, acc.num_processes, acc.gather, lambda t: acc.reduce(t, "sum")),
              _slice(cfg.prompts_per_step * cfg.samples_per_prompt, acc.process_index, acc.num_processes),
              stop_ids(tokenizer), delimiter_table(tokenizer, cfg.step_delimiter))
    # closed on the way out, so an error's message comes after the bar's last line, not before it
    bar = held.enter_context(progress(budget.steps(state), f"train {cfg.method}", "step",
                                      show=acc.is_main_process, initial=state.step))
    while budget.left(state):
        row = step(run, state)
        last = not budget.left(state)
        if eval_recs and (last or (cfg.eval_every and state.step % cfg.eval_every == 0)):
            row.update(checks.held_out())
        if method.curriculum and cfg.eval_every and state.step % cfg.eval_every == 0 and not last:
            row.update(checks.curriculum())
        _log(acc, out, row)
        bar.update(1)
        bar.set_postfix({k.split("/")[-1]: f"{v:.3g}" for k, v in row.items()
                         if k in ("loss/total", "teacher/kl", "eval/pass@1", "reward/mean")}, refresh=False)
        if last or (cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0):
            checkpoints.save(parallel.lm(), parallel.save_optimizer, method, state, tokenizer, templates, meta)
    bar.close()

    final = out / "model"
    if acc.is_main_process:
        _save_final(cfg, parallel.lm(), tokenizer, templates, meta, out)
    acc.wait_for_everyone()
    acc.end_training()
    summary = {"model": str(final), "processes": acc.num_processes, "parallel": parallel.name, **asdict(state)}
    log(f"saved {final} after {state.step} steps, {state.rollouts} rollouts, {state.seconds:.0f}s")
    return summary


def _accelerator(cfg: TrainConfig):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import set_seed

    # a second run in one process may ask for another precision; the process group itself is kept
    AcceleratorState._reset_state()
    # several processes (torchrun) on a machine without CUDA: accelerate sets up gloo only when told
    # it runs on the CPU; otherwise each process would train alone
    cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    acc = Accelerator(cpu=cpu, mixed_precision=cfg.mixed_precision, log_with=cfg.log_with,
                      project_dir=cfg.out if cfg.log_with else None)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if acc.device.type == "cpu":
        keep_freed_memory()  # the same tensors every step: reuse their pages (cpu.py)
    set_seed(cfg.seed)
    return acc


def _policy_model(cfg: TrainConfig, initial, model: str, copy_initial: bool):
    """(the model to train, the initial model, metadata to save with it). With LoRA the policy is
    the base with adapters and the initial model that base with the adapter off; otherwise the
    policy is the loaded model itself, or a copy when a checkpoint will overwrite its weights."""
    meta = None
    if cfg.lora_r:
        lm = add_lora(initial, cfg.lora_r, cfg.lora_alpha, cfg.lora_targets)
        initial = AdapterOff(lm)
        meta = {"base_model": str(Path(model).resolve()) if Path(model).exists() else model}
    else:
        lm = copy.deepcopy(initial) if copy_initial else initial
    if cfg.grad_checkpointing:  # the student's forward for the loss; sampling uses the KV cache as before
        enable = getattr(lm, "activation_checkpointing_enable", None)  # transformers >= 5.2 renamed it
        if enable is not None:
            enable({"use_reentrant": False})
        else:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return lm, initial, meta


def task_and_records(cfg: TrainConfig):
    """(the embedded task or None, training records, held-out records) as `cfg` describes them:
    the run's data, with the scenario's references (terse, answer only, shuffled) applied."""
    if cfg.data:
        train_recs = load_records(cfg.data, cfg.fields)
        eval_recs = load_records(cfg.eval_data, cfg.fields) if cfg.eval_data else []
        task = None
    else:
        task = get_task(cfg.task or DEFAULT_TASK)
        level = cfg.level or task.post_level
        train_recs = records_from_task(task.split("train", cfg.train_n, level, seed=cfg.seed))
        eval_recs = records_from_task(task.split(cfg.eval_split, cfg.eval_n, level)) if cfg.eval_n else []
    if cfg.reference != "full":
        train_recs = [with_reference(r, cfg.reference, task) for r in train_recs]
    if cfg.shuffle_references:
        train_recs = shuffle_references(train_recs, cfg.seed)
    return task, train_recs, eval_recs


def _curriculum_records(cfg: TrainConfig, task) -> list:
    """What a curriculum watches: validation problems, never test ones."""
    if cfg.curriculum == "none":
        return []
    if cfg.data:
        return load_records(cfg.curriculum_data, cfg.fields)
    return records_from_task(task.split("validation", cfg.curriculum_n, cfg.level or task.post_level))


def with_reference(rec, reference: str, task):
    """The record as the scenario writes its reference: unchanged (full), terse (two operations
    per line, the intermediate result between them skipped) or answer-only (the solution dropped,
    the answer kept)."""
    if reference == "answer":
        return replace(rec, solution=None, answer=reference_answer(rec))
    if reference == "terse":
        return replace(rec, solution=task.rewrite(rec.solution, "terse") or rec.solution)
    return rec


def _bootstrap_stage(cfg, acc, out: Path, state: State, lm, tokenizer, templates, records, task, log):
    """Runs once, before step 1; a resumed run reads back the solutions it kept."""
    if state.step > 0:
        return load_bootstrap(out / BOOTSTRAP_FILE)
    t0 = time.time()
    budget = cfg.bootstrap_rollouts or cfg.rollouts // 2
    solved, stats = bootstrap(lm, tokenizer, templates, records, task, replace(cfg, bootstrap_rollouts=budget),
                              acc, log)
    state.rollouts = state.bootstrap_rollouts = stats["bootstrap/rollouts"]
    state.seconds += time.time() - t0
    if acc.is_main_process:
        save_bootstrap(solved, out / BOOTSTRAP_FILE)
    _log(acc, out, {"step": 0, "rollouts": state.rollouts, "samples": state.rollouts, "tokens": 0, "seconds": round(state.seconds, 2), **stats})
    if not solved:
        raise UsageError("bootstrap solved none of the answer-only problems; raise bootstrap_rollouts "
                         "or bootstrap_k, or set bootstrap_k=0 to show the teacher the bare answer "
                         "(which can teach the student to guess)")
    return solved


AUTO_CHECK = 32  # records the counterfactual=auto check reads: enough to tell 50% from 0% (probe.states_answers_first)


def resolve_counterfactual(cfg: TrainConfig, model, tokenizer, templates, records, check, log) -> str:
    """`counterfactual=auto`: "shuffled" if the teacher, shown the reference, states the answer
    before the work (answers.stated_before_work) more often than the student does, beyond chance,
    on the first AUTO_CHECK training records, greedy; else "none". A teacher that does is one whose
    target teaches guessing (BENCHMARKS.md §P: a pretrained instruct model learnt to state answers
    first in 8 steps); a teacher that works from the reference keeps its target, and its one
    teacher pass a step. Greedy and in a forked RNG: the run samples what it would have sampled."""
    from handrail.methods import METHODS
    from handrail.commands.probe import states_answers_first

    if not METHODS[cfg.method].distils or cfg.prompts_per_step < 2:
        return "none"  # nothing to shape, or no other problem in a step to take a wrong reference from
    # answer-only records are bootstrapped into worked ones before the teacher sees them (bootstrap_k)
    bootstrapped = cfg.hint == "solution" and cfg.bootstrap_k > 0
    recs = list(itertools.islice((r for r in records if r.completion is None and reference_answer(r) is not None
                                  and (r.solution or not bootstrapped)), AUTO_CHECK))  # a file's first few only
    if len({r.text for r in recs}) < 2:
        return "none"
    with torch.random.fork_rng(devices=[]):
        kw = dict(task=check, samples=0, max_new_tokens=cfg.max_new_tokens)
        student = evaluate(model, tokenizer, templates, recs, hint="none", **kw)["leak_rate"]
        teacher = evaluate(model, tokenizer, templates, recs, hint=cfg.hint, **kw)["leak_rate"]
    on = states_answers_first(teacher, student, len(recs))
    log(f"counterfactual=auto: shown the reference the teacher states the answer before the work in "
        f"{teacher:.0%} of {len(recs)} greedy attempts, the student alone in {student:.0%}: "
        + ("counterfactual=shuffled (only what the right reference adds over another problem's is distilled)"
           if on else "counterfactual=none"))
    return "shuffled" if on else "none"


def _resolve_logged(cfg: TrainConfig, records, log) -> None:
    """Logged-conversation records carry the text to train on, so nothing is sampled for them."""
    known = facts(records)  # from a file's index: a million records are not read to count them
    logged = known.logged
    if logged and logged != known.n:
        raise UsageError(f"{known.first_unlogged}: a plain record among logged conversations; give them in separate files")
    from handrail.methods import METHODS

    if logged and not METHODS[cfg.method].reads_logged:
        raise UsageError(f"{records[0].source}: logged conversations train with method self-distill, "
                         f"not {cfg.method}")
    if logged and cfg.rollout == "student":
        cfg.rollout = "logged"
        log(f"logged conversations: training on {logged} assistant turns already written; nothing is sampled")
    if cfg.rollout == "logged" and not logged:
        raise UsageError("config key 'rollout': logged needs logged-conversation records "
                         "(messages with one \"accepted\": true assistant turn)")
    if logged and cfg.rollout != "logged":
        raise UsageError(f"config key 'rollout': {cfg.rollout} cannot be used with logged conversations")


def _finite_or_none(v):
    return None if isinstance(v, float) and not math.isfinite(v) else v


def _log(acc, out: Path, row: dict) -> None:
    if acc.is_main_process:  # strict JSON: a non-finite number is written as null
        line = json.dumps({k: _finite_or_none(v) for k, v in row.items()}, allow_nan=False) + "\n"
        with writing(out / "metrics.jsonl"), open(out / "metrics.jsonl", "a") as f:
            f.write(line)
    acc.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=row["step"])
