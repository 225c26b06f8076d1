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

Methods differ only in `score` and the chunk loss they compute from its signal (methods.py).
With `lora_r`, the policy is the base with peft adapters and the base with the adapter off is
the initial model (teacher, reference): no second copy of the weights.
Losses are sums over tokens divided by the *global* token count, so N processes at a global
batch of B reproduce one process at B.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from handrail import config as C
from handrail.bootstrap import FILE as BOOTSTRAP_FILE
from handrail.bootstrap import bootstrap, needs_bootstrap
from handrail.bootstrap import load as load_bootstrap
from handrail.bootstrap import save as save_bootstrap
from handrail.cpu import keep_freed_memory
from handrail.data import records_from_task, reference_answer
from handrail.datafile import facts, load_records, shuffle_references
from handrail.evaluate import PromptIds, evaluate, fit_records, prompt_limit
from handrail.models import (AdapterOff, HiddenStates, add_lora, first_line, load_model, nonfinite_weight,
                             save_model, stop_ids)
from handrail.rollout import sample
from handrail.sharding import Shards, by_position, load_optimizer
from handrail.steps import delimiter_table, step_ends
from handrail.tasks import DEFAULT_TASK, get_task
from handrail.verifiers import FileTask
from handrail.run import FolderLock, model_folder, progress, writing


def _registry(module: str, name: str):
    """A registry read when a config is checked (methods.py imports this module)."""
    import importlib

    return getattr(importlib.import_module(f"handrail.{module}"), name)


@dataclass
class TrainConfig:
    model: str = ""  # HF folder / hub id / .gguf / 'smollm2'
    templates: str | None = None  # JSON file with "student" and "teacher" prompt templates (default: the model's own, else English)
    out: str = "runs/train"  # run folder: config.json, metrics.jsonl, checkpoint/, model/
    task: str | None = None  # embedded task (default: chain); ignored with `data`
    data: str | None = None  # JSONL / Parquet / datasets folder of training records
    eval_data: str | None = None  # held-out records for `data` runs (default: none)
    fields: str | None = None  # data: other field names, "prompt=question,solution=answer" (common layouts need none)
    verifier: str = "exact"  # data: how answers are checked: exact | math (math-verify) | module:function
    method: str = "self-distill"  # self-distill | grpo | sft | rlsd (grpo, the teacher sizing each token) | srpo (solved rollouts to grpo, failed to self-distill) | vine (grpo with Monte Carlo step values) | expert-iteration (step-level search, its visit counts distilled)
    rule: str = "trust-region"  # aggregation (targets.py): trust-region | geometric | support | none | considered | anchored
    teacher: str = "frozen"  # frozen (initial weights) | live (current, no grad) | ema
    ema_decay: float = 0.95  # for teacher=ema
    hint: str = "solution"  # what the teacher sees: solution | answer | blank (the teacher's prompt with an empty reference: the no-reference control)
    shuffle_references: bool = False  # the shuffled-reference control: each training record shows the teacher another record's reference
    reference: str = "full"  # what training records carry: full (worked, the student's style) | terse (embedded tasks: intermediate results skipped) | answer (only the final answer)
    lam: float = 0.5  # geometric rule: weight of the teacher
    delta: float = 1.0  # trust-region: max nats the teacher may move the student per token and step; anchored: from the initial student, in all
    tau: float = 0.1  # considered: the initial student's probability above which the teacher may promote a token
    lam_max: float = 1.0  # trust-region rule: upper end of the lambda search
    support_top_p: float = 0.9  # support rule: the student's nucleus
    counterfactual: str = "none"  # self-distill: none | shuffled: the teacher counts only beyond what another problem's reference also makes it say (targets.counterfactual; one more teacher pass and the initial model's)
    teacher_topk: int = 0  # self-distill: 0 = the teacher's full distribution; K = its K most likely tokens plus a tail bucket (what a served teacher sends)
    intervene_kl: float = 0.01  # a position counts as "teacher intervened" above this KL(q||p_S)
    gate: str = "divergence"  # none | divergence: silence the teacher after the student leaves its path | point: only where it leaves
    rollout: str = "student"  # student: g ~ pi(.|P_S) | guided: each token from A(p_S, p_T) | logged: the data's turns
    guided_until: float = 1.0  # rollout=guided: the share of training steps, from the start, whose rollouts are guided (the student's own after)
    gate_prob: float = 0.05  # divergence gate: a sampled token the teacher gives < this ends its say
    after_gate: str = "free"  # where the gate silences the teacher: free (no loss) | anchor (pull towards the initial model)
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
    clip_eps: float = 0.2  # grpo: ratio clip
    teacher_weight_clip: float = 0.2  # rlsd: the teacher scales a token's advantage within 1 +- this
    kl_coef: float = 0.0  # grpo: weight of KL to the initial model (0 = no reference pass)
    grpo_loss: str = "dapo"  # grpo: how token losses are averaged: dapo (over tokens) | grpo (per sequence) | dr_grpo (constant)
    scale_rewards: bool = True  # grpo: divide advantages by the group's reward std (Dr. GRPO: false)
    vine_points: int = 2  # vine: branch points per rollout (its start and step ends)
    vine_k: int = 2  # vine: continuations per branch point; each counts as a rollout
    step_delimiter: str = "\n"  # what ends a step (vine, search): a line break by default
    search_simulations: int = 2  # expert-iteration: pUCT simulations per move
    search_candidates: int = 4  # expert-iteration: next steps sampled per expansion
    search_value: str = ""  # expert-iteration: check (the task's program check) | answer (the reference) | "" (check where the task has one)
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

    RANGES = {
        "ema_decay": "[0, 1]", "lam": "[0, 1]", "delta": "[0, )", "tau": "[0, 1]", "lam_max": "[0, 1]",
        "support_top_p": "(0, 1]", "intervene_kl": "[0, )", "gate_prob": "[0, 1]", "guided_until": "[0, 1]", "rollouts": "[1, )",
        "bootstrap_k": "[0, )", "bootstrap_rollouts": "[0, )", "prompts_per_step": "[1, )",
        "samples_per_prompt": "[1, )", "max_new_tokens": "[1, )", "temperature": "[0, )", "top_p": "(0, 1]",
        "lr": "(0, )", "weight_decay": "[0, )", "grad_clip": "(0, )", "clip_eps": "(0, )", "teacher_weight_clip": "[0, 1]", "kl_coef": "[0, )",
        "chunk_size": "[1, )", "level": "[1, )", "train_n": "[1, )", "eval_n": "[0, )", "eval_every": "[0, )",
        "eval_samples": "[0, )", "checkpoint_every": "[0, )", "threads": "[0, )", "max_nonfinite": "[1, )",
        "lora_r": "[0, )", "lora_alpha": "(0, )", "vine_points": "[1, )", "vine_k": "[1, )", "search_simulations": "[1, )", "search_candidates": "[1, )",
        "brevity_step": "(0, 1]", "brevity_max": "[0, 1]", "brevity_margin": "[0, 1]", "brevity_patience": "[0, )",
        "curriculum_n": "[1, )", "teacher_topk": "[0, )",
    }
    CHOICES = {
        "method": lambda: _registry("methods", "METHODS"), "rule": lambda: _registry("targets", "RULES"),
        "teacher": ("frozen", "live", "ema"), "counterfactual": ("none", "shuffled"), "gate": ("none", "divergence", "point"), "after_gate": ("free", "anchor"),
        "rollout": ("student", "guided", "logged"), "bootstrap_rollout": ("student", "guided"),
        "grpo_loss": ("dapo", "grpo", "dr_grpo"), "hint": ("solution", "answer", "blank"), "reference": ("full", "terse", "answer"),
        "mixed_precision": ("no", "bf16", "fp16"), "truncate": ("error", "left"),
        "eval_split": ("test", "validation"), "curriculum": ("none", "brevity"), "search_value": ("", "check", "answer"),
    }

    def validate(self):
        """Rules that join several keys (ranges and choices: RANGES, CHOICES, checked by config.build)."""
        if not self.model:
            raise ValueError("config key 'model': required")
        from handrail.data import parse_fields
        from handrail.methods import METHODS
        from handrail.verifiers import load as load_verifier

        parse_fields(self.fields)
        load_verifier(self.verifier)
        if self.lora_r and self.teacher == "ema":
            raise ValueError("config key 'teacher': ema keeps its own copy of every weight; with LoRA "
                             "(lora_r > 0) use frozen (the base, adapter off) or live")
        if self.fsdp and self.lora_r:
            raise ValueError("config key 'fsdp': sharding LoRA adapters is not built (their base is frozen and "
                             "shared; data-parallel training without fsdp keeps one copy of it per process)")
        if self.fsdp and self.mixed_precision == "fp16":
            raise ValueError("config key 'fsdp': with fsdp use mixed_precision bf16 (fp16 would need a loss "
                             "scaler, which the sharded path does not have)")
        if self.lora_merge and not self.lora_r:
            raise ValueError("config key 'lora_merge': there is no adapter to merge (lora_r is 0)")

        METHODS[self.method].check(self)
        if self.bootstrap_k and self.bootstrap_rollouts >= self.rollouts:
            raise ValueError(f"config key 'bootstrap_rollouts': {self.bootstrap_rollouts} leaves nothing of "
                             f"the budget rollouts={self.rollouts} for training")
        if self.rollouts < self.rollouts_per_step:
            raise ValueError(f"config key 'rollouts': {self.rollouts} does not buy one step of "
                             f"prompts_per_step x samples_per_prompt"
                             + (" x (1 + vine_points x vine_k)" if METHODS[self.method].rollouts_per_sample(self) > 1 else "")
                             + f" = {self.rollouts_per_step} rollouts")
        if self.curriculum != "none":
            if not METHODS[self.method].rewarded:
                rewarded = ", ".join(name for name, m in METHODS.items() if m.rewarded)
                raise ValueError(f"config key 'curriculum': {self.curriculum} shapes a reward; method {self.method} "
                                 f"has none (use {rewarded})")
            if not self.eval_every:
                raise ValueError("config key 'eval_every': the curriculum checks validation accuracy every "
                                 "eval_every steps, so it must be > 0")
            if self.data and not self.curriculum_data:
                raise ValueError("config key 'curriculum_data': with --data the curriculum needs validation "
                                 "records of its own (never the test file)")
        if not self.step_delimiter:
            raise ValueError("config key 'step_delimiter': must not be empty")
        if self.counterfactual != "none":
            if self.prompts_per_step < 2:
                raise ValueError("config key 'counterfactual': the wrong reference is another problem's in the same "
                                 "step, so prompts_per_step must be at least 2")
        if self.shuffle_references and self.reference == "answer":
            raise ValueError("config key 'shuffle_references': answer-only records have no reference to shuffle "
                             "(their answers are what they are checked against)")
        if self.reference == "terse" and self.data:
            raise ValueError("config key 'reference': terse rewrites an embedded task's references; "
                             "with --data, give terse solutions in the file")

    def aggregation_rule(self):
        """`rule` with its own parameters bound: (logp_S, logp_T) -> log q (targets.py)."""
        from handrail.targets import make_rule

        return make_rule(self.rule, lam=self.lam, delta=self.delta, lam_max=self.lam_max, top_p=self.support_top_p,
                         tau=self.tau)

    @property
    def rollouts_per_step(self) -> int:
        """Sampled completions per step: the rollouts, and for vine every continuation too."""
        from handrail.methods import METHODS

        return self.prompts_per_step * self.samples_per_prompt * METHODS[self.method].rollouts_per_sample(self)


@dataclass
class State:
    """Everything a resumed run needs besides weights and optimizer."""

    step: int = 0
    rollouts: int = 0  # including the bootstrap stage's
    bootstrap_rollouts: int = 0
    tokens: int = 0
    seconds: float = 0.0
    nonfinite_steps: int = 0  # steps skipped because their loss or gradient was not finite
    nonfinite_run: int = 0  # of which in a row, up to now


class NonFinite(RuntimeError):
    """Training produced non-finite numbers too often to go on."""


def _slice(n: int, rank: int, world: int) -> slice:
    if n % world:
        raise ValueError(f"global batch {n} is not divisible by {world} processes")
    per = n // world
    return slice(rank * per, (rank + 1) * per)


def train(cfg: TrainConfig, resume: bool = False, log=print) -> dict:
    with contextlib.ExitStack() as held:  # the run folder's lock, for the run's lifetime
        return _train(cfg, resume, log, held)


def _train(cfg: TrainConfig, resume: bool, log, held: contextlib.ExitStack) -> dict:
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from handrail.methods import METHODS, World

    from accelerate.state import AcceleratorState

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
    out = Path(cfg.out)
    ckpt = next(iter(_checkpoints(out)), None)
    if not resume and (out / "metrics.jsonl").exists() and (ckpt or (out / "model").exists()):
        raise ValueError(f"{out}: already holds a run (metrics.jsonl); continue it with --resume {out} "
                         f"or choose another --out")
    # a run stopped before its first checkpoint has nothing to continue from: it starts again
    restart = (out / "metrics.jsonl").exists() and ckpt is None
    ckpt = ckpt if resume else None
    task, train_recs, eval_recs = _records(cfg)
    curriculum_recs = _curriculum_records(cfg, task)
    _resolve_logged(cfg, train_recs, log)
    check = task or FileTask(cfg.verifier)  # what verifies an answer and spots a leak

    # -- model, method (before anything is written: a model that fails to load leaves no run) ----
    model = model_folder(cfg.model)  # 'default': the embedded base, built on first use
    initial, tokenizer, templates = load_model(model, device=acc.device, templates=cfg.templates)
    limit = prompt_limit(initial, cfg.max_new_tokens)
    hints = ("none", cfg.hint) if METHODS[cfg.method].privileged else ("none",)
    prompts = PromptIds(tokenizer, templates)  # each record tokenized once, here, for the whole run
    train_recs = fit_records(tokenizer, train_recs, templates, limit, cfg.truncate, hints, prompts)
    eval_recs = fit_records(tokenizer, eval_recs, templates, limit, cfg.truncate, ("none",))
    curriculum_recs = fit_records(tokenizer, curriculum_recs, templates, limit, cfg.truncate, ("none",))
    meta = None
    if cfg.lora_r:  # adapters on the base; the base itself, adapter off, is the initial model
        lm = add_lora(initial, cfg.lora_r, cfg.lora_alpha, cfg.lora_targets)
        initial = AdapterOff(lm)
        meta = {"base_model": str(Path(model).resolve()) if Path(model).exists() else model}
    else:
        lm = copy.deepcopy(initial) if ckpt else initial
    if cfg.grad_checkpointing:  # the student's forward for the loss; sampling uses the KV cache as before
        enable = getattr(lm, "activation_checkpointing_enable", None)  # transformers >= 5.2 renamed it
        if enable is not None:
            enable({"use_reentrant": False})
        else:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy = HiddenStates(lm).train()
    method = METHODS[cfg.method](cfg, initial, tokenizer, templates, check, prompts)  # copies what it keeps
    state, opt_state = State(), None
    if ckpt:
        state, opt_state = _load_checkpoint(out, lm, method, acc.device, log)
    if cfg.fsdp and acc.num_processes == 1:
        log("fsdp: a single process has nothing to shard; training unsharded")
    # sharded (sharding.py): the optimizer must see the sharded parameters, so it comes after
    shards = Shards(policy, cfg.mixed_precision) if cfg.fsdp and acc.num_processes > 1 else None
    # fused: one kernel for the whole update (what transformers' Trainer, and so TRL, uses by
    # default); sharded parameters take foreach, a few calls instead of a few per tensor
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=cfg.lr,
                            weight_decay=cfg.weight_decay, **({"foreach": True} if shards else {"fused": True}))
    if isinstance(opt_state, Path):  # a sharded run's: its shards, read by every process
        load_optimizer(policy, opt, opt_state)
    elif opt_state is not None:
        if shards:
            shards.load_optimizer_state(opt, opt_state)
        else:
            opt.load_state_dict(by_position(policy, opt_state))
    acc.wait_for_everyone()  # every process has checked before the main one writes
    if acc.is_main_process:
        held.enter_context(FolderLock(out))  # a second run on this folder stops here, having written nothing
        if ckpt:  # rows past the checkpoint are redone; only the lock's holder may cut them
            _truncate_metrics(out / "metrics.jsonl", state.step)
        if restart:
            log(f"{out}: the run there stopped before its first checkpoint; starting it again from step 0")
            for name in ("metrics.jsonl", BOOTSTRAP_FILE):
                (out / name).unlink(missing_ok=True)
        out.mkdir(parents=True, exist_ok=True)
        with writing(out / "config.json"):
            C.save(cfg, out / "config.json")
    if shards is None:
        policy, opt = acc.prepare(policy, opt)

    plain = acc.unwrap_model(policy).lm  # the same module throughout (unwrapping costs a lookup each time)

    def current_lm():
        """The policy's weights as a plain model, for everything but the training forward."""
        return shards.rollout_lm if shards else plain

    def save_optimizer(folder: Path):  # every process calls it
        if shards:
            shards.save_optimizer(opt, folder / "optimizer")  # each its own shards
        elif acc.is_main_process:
            torch.save(opt.state_dict(), folder / "optimizer.pt")
    if cfg.log_with:
        acc.init_trackers(out.name, config=asdict(cfg))
    stops = stop_ids(tokenizer)
    world = World(acc.process_index, acc.num_processes, acc.gather, lambda t: acc.reduce(t, "sum"))
    rows = _slice(cfg.prompts_per_step * cfg.samples_per_prompt, acc.process_index, acc.num_processes)
    sampling = method.needs_rollouts and cfg.rollout != "logged"
    delimiters = delimiter_table(tokenizer, cfg.step_delimiter)  # to record where each rollout's steps end

    def evaluate_now():
        if not acc.is_main_process:
            return {}
        res = evaluate(current_lm(), tokenizer, templates, eval_recs, task=check,
                       samples=cfg.eval_samples, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
        return {"eval/pass@1": res["accuracy"], "eval/pass@1_lenient": res["accuracy_lenient"],
                "eval/pass@1_sampled": res["accuracy_sampled"], "eval/leak_rate": res["leak_rate"], "eval/tokens_per_solved": res["tokens_per_solved"],
                "eval/n": res["n"]}

    def curriculum_check():
        """The curriculum's validation check; every process moves its copy the same way."""
        res = evaluate(current_lm(), tokenizer, templates, curriculum_recs, task=check,
                       samples=0, max_new_tokens=cfg.max_new_tokens)
        method.curriculum.update(res["accuracy"])
        return {"curriculum/val_pass@1": res["accuracy"], "curriculum/val_tokens_per_solved": res["tokens_per_solved"],
                "curriculum/alpha": method.curriculum.alpha}

    if state.step == 0 and eval_recs:
        _log(acc, out, {"step": 0, "rollouts": 0, "tokens": 0, "seconds": 0.0, **evaluate_now()})

    # 0. answer-only records: sample worked solutions first and keep those that verify (bootstrap.py)
    answer_only = needs_bootstrap(train_recs) if method.needs_solutions else []
    if answer_only and cfg.bootstrap_k:
        train_recs = _bootstrap_stage(cfg, acc, out, state, current_lm(), tokenizer, templates,
                                      train_recs, check, log)
    elif answer_only and cfg.hint == "solution":
        log(f"{len(answer_only)} records have only an answer: '#### <answer>' stands in for their solution "
            f"(bootstrap_k=0; a teacher shown a bare answer can teach the student to guess)")
    if len(train_recs) < cfg.prompts_per_step:
        raise ValueError(f"{len(train_recs)} training records, fewer than prompts_per_step="
                         f"{cfg.prompts_per_step}; lower prompts_per_step or add records")
    total_steps = (cfg.rollouts - state.bootstrap_rollouts) // cfg.rollouts_per_step
    # closed on the way out, so an error's message comes after the bar's last line, not before it
    bar = held.enter_context(progress(total_steps, f"train {cfg.method}", "step", show=acc.is_main_process,
                                      initial=state.step))

    while state.step < total_steps and not (state.step and state.rollouts >= cfg.rollouts):
        t0 = time.time()
        # 1. sample prompts: one global draw (same on every process); this process takes its rows
        rng = random.Random(f"{cfg.seed}/{state.step}")
        batch = [r for r in rng.sample(train_recs, cfg.prompts_per_step) for _ in range(cfg.samples_per_prompt)]
        local = batch[rows]

        # 2. roll out the student (or take text already written: references, logged turns)
        lm_now = current_lm()
        lm_now.eval()
        if sampling:
            rollout = sample(lm_now, tokenizer, method.prompts(local),
                             max_new_tokens=cfg.max_new_tokens, stop_ids=stops,
                             temperature=cfg.temperature, top_p=cfg.top_p,
                             seed=cfg.seed * 100_003 + state.step, row_offset=rows.start,
                             global_rows=len(batch), guide=method.guide(local, lm_now, state.step / total_steps))
        else:
            rollout = method.given_rollout(local, acc.device, lm_now)
        lm_now.train()
        rollout.step_ends = step_ends(rollout.completion_ids, rollout.completion_mask, delimiters)

        # 3. score: the per-token signal, with no gradient
        signal = method.score(local, rollout, lm_now, world)

        # 4. loss on completion tokens, normalised by the global token count
        n_tokens = acc.reduce(torch.tensor(float(rollout.n_tokens), device=acc.device), "sum").item()
        loss_sum, metrics = method.student_loss(policy, local, rollout, signal)  # inside the wrapped forward
        acc.backward(loss_sum * acc.num_processes / max(n_tokens, 1.0))
        grad_norm = shards.clip_grad_norm_(cfg.grad_clip) if shards else acc.clip_grad_norm_(policy.parameters(), cfg.grad_clip)
        finite = bool(torch.isfinite(loss_sum.detach()) and torch.isfinite(torch.as_tensor(grad_norm)))
        if finite:  # a non-finite step would write NaN into every weight: skip it instead
            opt.step()
        if shards:  # a collective: every process joins it, stepped or not
            shards.refresh()
        if finite:
            method.after_step(current_lm())
            state.nonfinite_run = 0
        else:
            state.nonfinite_steps += 1
            state.nonfinite_run += 1
        opt.zero_grad(set_to_none=True)
        if state.nonfinite_run >= cfg.max_nonfinite:
            raise NonFinite(f"{state.nonfinite_run} steps in a row had a non-finite loss or gradient (step "
                            f"{state.step + 1}; lr={cfg.lr:g}); stopped, and the last good checkpoint in {out} is kept")

        # 5. log, evaluate, checkpoint
        state.step += 1
        if method.spent is not None:  # a method whose cost varies (expert iteration's search) counts its own
            state.rollouts += int(acc.reduce(torch.tensor(float(method.spent), device=acc.device), "sum").item())
        else:
            state.rollouts += cfg.rollouts_per_step if sampling else 0
        state.tokens += int(n_tokens)
        sums = acc.reduce(torch.stack([loss_sum.detach()] + [m.detach().float() for m in metrics.values()]), "sum")
        state.seconds += time.time() - t0
        row = {"step": state.step, "rollouts": state.rollouts, "bootstrap_rollouts": state.bootstrap_rollouts,
               "tokens": state.tokens, "seconds": round(state.seconds, 2), "time/step_s": round(time.time() - t0, 3),
               "loss/total": sums[0].item() / max(n_tokens, 1.0), "loss/grad_norm": float(grad_norm),
               "nonfinite_steps": state.nonfinite_steps,
               "rollout/steps": sum(map(len, rollout.step_ends)) / max(1, len(rollout.step_ends)),
               **{k: v.item() / max(n_tokens, 1.0) for k, v in zip(metrics, sums[1:])},
               **method.step_metrics(signal)}
        last = state.step == total_steps or state.rollouts >= cfg.rollouts  # (the latter: a varying cost's budget spent)
        if eval_recs and (last or (cfg.eval_every and state.step % cfg.eval_every == 0)):
            row.update(evaluate_now())
        if method.curriculum and cfg.eval_every and state.step % cfg.eval_every == 0 and not last:
            row.update(curriculum_check())
        _log(acc, out, row)
        bar.update(1)
        bar.set_postfix({k.split("/")[-1]: f"{v:.3g}" for k, v in row.items()
                         if k in ("loss/total", "teacher/kl", "eval/pass@1", "reward/mean")}, refresh=False)
        if last or (cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0):
            _save_checkpoint(acc, out, current_lm(), save_optimizer, method, state, tokenizer, templates, meta)
    bar.close()
    final = out / "model"
    if acc.is_main_process:
        _check_finite(current_lm(), out)
        with writing(final, partial=final):  # the checkpoint (written at the last step) stays
            save_model(current_lm(), tokenizer, final, templates, meta)
        if cfg.lora_merge:
            with writing(out / "model-merged", partial=out / "model-merged"):
                save_model(current_lm().merge_and_unload(), tokenizer, out / "model-merged", templates)
    acc.wait_for_everyone()
    acc.end_training()
    summary = {"model": str(final), "processes": acc.num_processes, **asdict(state)}
    log(f"saved {final} after {state.step} steps, {state.rollouts} rollouts, {state.seconds:.0f}s")
    return summary


def _records(cfg: TrainConfig):
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
    _log(acc, out, {"step": 0, "rollouts": state.rollouts, "tokens": 0, "seconds": round(state.seconds, 2), **stats})
    if not solved:
        raise ValueError("bootstrap solved none of the answer-only problems; raise bootstrap_rollouts "
                         "or bootstrap_k, or set bootstrap_k=0 to show the teacher the bare answer "
                         "(which can teach the student to guess)")
    return solved


def _resolve_logged(cfg: TrainConfig, records, log) -> None:
    """Logged-conversation records carry the text to train on, so nothing is sampled for them."""
    known = facts(records)  # from a file's index: a million records are not read to count them
    logged = known.logged
    if logged and logged != known.n:
        raise ValueError(f"{known.first_unlogged}: a plain record among logged conversations; give them in separate files")
    from handrail.methods import METHODS

    if logged and not METHODS[cfg.method].reads_logged:
        raise ValueError(f"{records[0].source}: logged conversations train with method self-distill, "
                         f"not {cfg.method}")
    if logged and cfg.rollout == "student":
        cfg.rollout = "logged"
        log(f"logged conversations: training on {logged} assistant turns already written; nothing is sampled")
    if cfg.rollout == "logged" and not logged:
        raise ValueError("config key 'rollout': logged needs logged-conversation records "
                         "(messages with one \"accepted\": true assistant turn)")
    if logged and cfg.rollout != "logged":
        raise ValueError(f"config key 'rollout': {cfg.rollout} cannot be used with logged conversations")


def _finite_or_none(v):
    return None if isinstance(v, float) and not math.isfinite(v) else v


def _log(acc, out: Path, row: dict) -> None:
    if acc.is_main_process:  # strict JSON: a non-finite number is written as null
        line = json.dumps({k: _finite_or_none(v) for k, v in row.items()}, allow_nan=False) + "\n"
        with writing(out / "metrics.jsonl"), open(out / "metrics.jsonl", "a") as f:
            f.write(line)
    acc.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=row["step"])


# -- checkpoints: written beside the good one, swapped in only when complete ---------------------
CHECKPOINTS = ("checkpoint", "checkpoint.old", "checkpoint.prev")  # newest first; .old survives a crash mid-swap


def _checkpoints(out: Path) -> list[Path]:
    """The run's complete checkpoints (state.json is written last), newest first."""
    return [out / name for name in CHECKPOINTS if (out / name / "state.json").exists()]


def _load_checkpoint(out: Path, lm, method, device, log) -> tuple[State, dict | Path]:
    """Weights, method and state from the newest checkpoint that loads, and its optimizer state
    (loaded by the caller once the optimizer exists: a dict, or a sharded run's folder of shards);
    a damaged one is named and passed over for the one before it, and if none loads the error
    names the file."""
    damaged = []
    for c in _checkpoints(out):
        part = c / "state.json"
        try:
            state = State(**json.loads(part.read_text()))
            part = c / "model"
            lm.load_state_dict(load_model(str(part), device=device)[0].state_dict())
            if (c / "optimizer").is_dir():  # written shard by shard (sharding.Shards.save_optimizer)
                part = c / "optimizer" / ".metadata"
                if not part.is_file():
                    raise FileNotFoundError("missing")
                opt_state = c / "optimizer"
            else:
                part = c / "optimizer.pt"
                opt_state = torch.load(part, map_location=_storage(device), weights_only=True)
            part = c / "method.pt"
            method.load_state_dict(torch.load(part, map_location=_storage(device), weights_only=True))
        except Exception as e:  # noqa: BLE001 - any damage: try the previous checkpoint
            damaged.append(f"{part} ({first_line(e)})")
            continue
        if damaged:
            log(f"WARNING: damaged checkpoint file {damaged[0]}; resuming from {c} (step {state.step}) instead")
        return state, opt_state
    raise ValueError(f"cannot resume: damaged checkpoint file {damaged[0]}" +
                     ("; the older ones are damaged too" if len(damaged) > 1 else "; no older checkpoint to fall back to"))


def _save_checkpoint(acc, out: Path, lm, save_optimizer, method, state: State, tokenizer, templates,
                     meta=None) -> None:
    """`save_optimizer(folder)`, called on every process, writes the optimizer's state into the
    new checkpoint's folder (sharded, each process writes its shards: none gathers the whole)."""
    tmp, good, old = out / "checkpoint.tmp", out / "checkpoint", out / "checkpoint.old"
    if acc.is_main_process:
        _check_finite(lm, out)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    # a write that fails (a full disk) removes the half-written folder; the previous checkpoint stays
    with writing(tmp, partial=tmp):
        save_optimizer(tmp)
        if acc.is_main_process:
            save_model(lm, tokenizer, tmp / "model", templates, meta)
            torch.save(method.state_dict(), tmp / "method.pt")
            (tmp / "state.json").write_text(json.dumps(asdict(state)))  # written last: marks it complete
    if acc.is_main_process:
        if good.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(good, old)
        os.replace(tmp, good)
        if old.exists():  # kept as the previous checkpoint, in case the newest is damaged later
            shutil.rmtree(out / "checkpoint.prev", ignore_errors=True)
            os.replace(old, out / "checkpoint.prev")
    acc.wait_for_everyone()


def _check_finite(lm, out: Path) -> None:
    """Never save a model with a NaN or infinite weight (a finite step with a huge learning rate
    can make one)."""
    bad = nonfinite_weight(lm)
    if bad is not None:
        raise NonFinite(f"weight {bad!r} is no longer finite (learning rate too high?); nothing saved, "
                        f"and the last good checkpoint in {out} is kept")


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop rows logged after the checkpoint we resume from, so no step appears twice, and a last
    row half-written when the run was killed."""
    if path.exists():
        rows = []
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and row.get("step", 0) <= step:
                rows.append(line)
        path.write_text("".join(r + "\n" for r in rows))


def _storage(device):
    """torch.load's map_location: accelerate names a process's CPU 'cpu:0', which torch.load refuses."""
    device = torch.device(device)
    return torch.device("cpu") if device.type == "cpu" else device
