"""The training loop on a tiny model: every method runs, resume is exact, two processes equal one."""

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from handrail.commands.train import TrainConfig, train

TINY = dict(rollouts=32, prompts_per_step=8, max_new_tokens=24, eval_n=8, train_n=64, level=2,
            eval_every=2, checkpoint_every=2, lr=1e-3)


def cfg(model, out, **kw):
    return TrainConfig(model=model, out=str(out), **{**TINY, **kw})


def weights(folder):
    return load_file(os.path.join(folder, "model.safetensors"))


def rows(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


@pytest.mark.parametrize("kw", [
    dict(method="self-distill", rule="trust-region", teacher="frozen"),
    dict(method="self-distill", rule="support", teacher="ema", after_gate="anchor"),  # a second frozen copy
    dict(method="self-distill", rule="geometric", teacher="live", hint="answer"),
    dict(method="self-distill", rule="none", gate="divergence", gate_prob=0.5),
    dict(method="self-distill", rule="trust-region", gate="point", gate_prob=0.5, after_gate="anchor"),
    dict(method="self-distill", rule="trust-region", rollout="guided"),
    dict(method="self-distill", rule="considered", rollout="guided", teacher="live"),  # a third KV cache: p_0
    dict(method="self-distill", rule="anchored", reference="terse"),
    dict(method="self-distill", rule="considered", reference="answer", bootstrap_k=0),
    dict(method="self-distill", counterfactual="shuffled", shuffle_references=True),  # the two controls' machinery
    dict(method="self-distill", hint="blank", teacher="live", gate="none"),  # no reference: live teacher == student at first
    dict(method="grpo", samples_per_prompt=4, prompts_per_step=4, kl_coef=0.05, rollouts=64),
    dict(method="grpo", samples_per_prompt=4, prompts_per_step=4, grpo_loss="grpo", rollouts=64),
    dict(method="grpo", samples_per_prompt=4, prompts_per_step=4, grpo_loss="dr_grpo", scale_rewards=False,
         rollouts=64),
    dict(method="sft"),
    dict(method="rlsd", samples_per_prompt=4, prompts_per_step=4, rollouts=64),
    dict(method="srpo", samples_per_prompt=4, prompts_per_step=4, rollouts=64),
    dict(method="vine", prompts_per_step=2, vine_points=2, vine_k=2, rollouts=40),  # 2 rollouts + 8 branches a step
])
def test_each_method_runs_and_writes_a_run_folder(tiny_model, tmp_path, kw):
    out = tmp_path / "run"
    summary = train(cfg(tiny_model, out, **kw), log=lambda *_: None)
    log = rows(out)
    assert [r["step"] for r in log] == list(range(5))
    assert all(torch.isfinite(torch.tensor(r["loss/total"])) for r in log[1:])
    assert all(r["rollout/steps"] >= 1 for r in log[1:])  # step ends recorded on every rollout
    assert "eval/pass@1" in log[0] and "eval/pass@1" in log[-1]
    assert log[-1]["rollouts"] == (0 if kw["method"] == "sft" else kw.get("rollouts", 32))
    assert json.load(open(out / "config.json"))["method"] == kw["method"]
    assert (out / "model" / "config.json").exists() and (out / "checkpoint" / "state.json").exists()
    assert summary["step"] == 4
    before, after = weights(tiny_model), weights(out / "model")
    changed = any(not torch.equal(before[k], after[k]) for k in before)
    if kw["method"] in ("grpo", "rlsd"):  # no group with a reward difference means no gradient at all
        assert changed == any(r["reward/groups_with_signal"] > 0 for r in log[1:])
    elif kw["method"] == "vine":  # no step changed the value: no token has an advantage
        assert changed == any(r["vine/credited_tokens"] > 0 for r in log[1:])
    else:
        assert changed


def test_hybrids_route_each_rollout_by_its_reward(tiny_model):
    """SRPO: a solved rollout gets only the policy gradient, a failed one only distillation. RLSD:
    the teacher scales a token's advantage within 1 +- eps and never flips its sign."""
    from handrail.data.records import records_from_task
    from handrail.runtime.evaluate import prompt_ids
    from handrail.methods import RLSD, SRPO, World
    from handrail.runtime.models import HiddenStates, load_model
    from handrail.engine.rollout import given_rollout
    from handrail.data.tasks import get_task

    task = get_task("chain")
    lm, tok, templates = load_model(tiny_model)
    rec = records_from_task(task.split("train", 1, level=2))[0]
    recs = [rec] * 4
    texts = [rec.solution, rec.solution, "1+1=3\n#### 3", "#### 0"]  # two solved, two failed
    config = cfg(tiny_model, "unused", method="srpo", samples_per_prompt=4, prompts_per_step=1)
    acc = World()
    srpo = SRPO(config, lm, tok, templates, task)
    rollout = given_rollout(tok, prompt_ids(tok, recs, templates), texts)
    signal = srpo.score(recs, rollout, lm, acc)
    pg, sd = signal.pg, signal.sd
    assert pg.adv[:2].gt(0).all() and pg.adv[2:].lt(0).all()
    assert pg.weight[2:].abs().sum() == 0 and pg.weight[:2].gt(0).any()
    assert sd.mask[:2].sum() == 0 and sd.mask[2:].sum() > 0
    loss, metrics = srpo.student_loss(HiddenStates(lm), recs, rollout, signal)
    assert torch.isfinite(loss) and "teacher/kl" in metrics and "policy/clipped" in metrics

    rlsd = RLSD(cfg(tiny_model, "unused", method="rlsd", samples_per_prompt=4, prompts_per_step=1,
                    teacher_weight_clip=0.1), lm, tok, templates, task)
    signal = rlsd.score(recs, rollout, lm, acc)
    tokens = rollout.completion_mask > 0
    w = signal.weight[tokens]  # dapo weights are 1, so what is left is the teacher's factor
    assert w.min() >= 0.9 - 1e-6 and w.max() <= 1.1 + 1e-6 and w.std() > 0


def test_distillation_moves_the_student_towards_the_teacher(tiny_model, tmp_path):
    train(cfg(tiny_model, tmp_path / "r", rule="none", gate="none", rollouts=240, prompts_per_step=8, lr=3e-3,
              eval_every=0, checkpoint_every=0), log=lambda *_: None)
    log = rows(tmp_path / "r")[1:]
    first = sum(r["teacher/raw_kl"] for r in log[:5]) / 5
    last = sum(r["teacher/raw_kl"] for r in log[-5:]) / 5
    assert last < 0.7 * first, (first, last)


def test_anchor_is_silent_until_the_student_moves(tiny_model, tmp_path):
    """after_gate=anchor pulls gated positions towards the initial model: zero extra loss while the
    student still is the initial model (step 1), a different loss once it has moved (step 2)."""
    kw = dict(rollouts=16, gate_prob=0.5, eval_every=0, eval_n=0, checkpoint_every=0, lr=3e-3)
    train(cfg(tiny_model, tmp_path / "free", after_gate="free", **kw), log=lambda *_: None)
    train(cfg(tiny_model, tmp_path / "anchor", after_gate="anchor", **kw), log=lambda *_: None)
    free, anchor = rows(tmp_path / "free"), rows(tmp_path / "anchor")
    assert free[0]["teacher/gated"] > 0 and free[0]["teacher/gated"] == anchor[0]["teacher/gated"]
    assert anchor[0]["loss/total"] == pytest.approx(free[0]["loss/total"], rel=1e-4, abs=1e-7)
    assert anchor[1]["loss/total"] != pytest.approx(free[1]["loss/total"], rel=1e-3)
    # a live teacher needs a separate frozen anchor and two heads behind one; at step 1 both
    # are still the initial weights, so the loss matches the frozen teacher's
    train(cfg(tiny_model, tmp_path / "live", teacher="live", after_gate="anchor", **kw), log=lambda *_: None)
    live = rows(tmp_path / "live")
    assert live[0]["loss/total"] == pytest.approx(anchor[0]["loss/total"], rel=1e-4)
    assert live[0]["teacher/gated"] == anchor[0]["teacher/gated"]


def test_rules_reading_the_initial_student_see_it_and_not_the_current_one(tiny_model, tmp_path):
    """At step 1 the student is the initial model, so `anchored` equals `trust-region` there (same
    delta); later the two differ, because one measures from p_0 and the other from the moved student."""
    kw = dict(rollouts=24, gate="none", eval_every=0, eval_n=0, checkpoint_every=0, lr=3e-2, delta=0.001)
    train(cfg(tiny_model, tmp_path / "tr", rule="trust-region", **kw), log=lambda *_: None)
    train(cfg(tiny_model, tmp_path / "an", rule="anchored", **kw), log=lambda *_: None)
    tr, an = rows(tmp_path / "tr"), rows(tmp_path / "an")
    assert an[0]["loss/total"] == pytest.approx(tr[0]["loss/total"], rel=1e-5)
    assert an[2]["loss/total"] != pytest.approx(tr[2]["loss/total"], rel=1e-3)


def test_reference_scenarios_change_what_the_records_carry():
    from handrail.data.tasks import get_task
    from handrail.commands.train import task_and_records

    task = get_task("chain")
    full = task_and_records(TrainConfig(model="m", train_n=5, eval_n=0))[1]
    terse = task_and_records(TrainConfig(model="m", train_n=5, eval_n=0, reference="terse"))[1]
    answer = task_and_records(TrainConfig(model="m", train_n=5, eval_n=0, reference="answer"))[1]
    assert [r.prompt for r in full] == [r.prompt for r in terse] == [r.prompt for r in answer]
    assert all(len(t.solution.splitlines()) < len(f.solution.splitlines()) for f, t in zip(full, terse))
    assert all(task.verify(t.solution, f.answer) for f, t in zip(full, terse))
    assert all(a.solution is None and a.answer == f.answer for f, a in zip(full, answer))
    with pytest.raises(ValueError, match="reference"):
        TrainConfig(model="m", data="x.jsonl", reference="terse").validate()


def test_resume_continues_exactly(tiny_model, tmp_path):
    train(cfg(tiny_model, tmp_path / "full", rollouts=64), log=lambda *_: None)
    train(cfg(tiny_model, tmp_path / "cut", rollouts=32), log=lambda *_: None)
    # a crash during a later checkpoint write leaves a partial folder that must be ignored
    (tmp_path / "cut" / "checkpoint.tmp").mkdir()
    (tmp_path / "cut" / "checkpoint.tmp" / "optimizer.pt").write_text("partial")
    from handrail.config import build

    resumed = build(TrainConfig, tmp_path / "cut" / "config.json", ["rollouts=64"])
    train(resumed, resume=True, log=lambda *_: None)
    a, b = weights(tmp_path / "full" / "model"), weights(tmp_path / "cut" / "model")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert [r["step"] for r in rows(tmp_path / "cut")] == list(range(9))


def test_lora_trains_an_adapter_that_reloads_merges_and_resumes(tiny_model, tmp_path):
    """LoRA: only the adapter moves and is saved; the teacher is the base with the adapter off
    (no copy); the folder reloads onto its base, the merged model matches it, resume is exact."""
    pytest.importorskip("peft")
    from handrail.config import build
    from handrail.runtime.models import load_model

    kw = dict(lora_r=4, lora_alpha=8, lr=1e-2, rollouts=64)
    train(cfg(tiny_model, tmp_path / "full", lora_merge=True, **kw), log=lambda *_: None)
    model = tmp_path / "full" / "model"
    assert (model / "adapter_config.json").exists() and not (model / "model.safetensors").exists()
    assert json.load(open(model / "handrail.json"))["base_model"] == os.path.abspath(tiny_model)
    adapted, tok, _ = load_model(str(model))
    merged, _, _ = load_model(str(tmp_path / "full" / "model-merged"))
    base, _, _ = load_model(tiny_model)
    ids = torch.tensor([tok("12+3-4\n")["input_ids"]])
    with torch.no_grad():
        a, m, b = adapted(ids).logits, merged(ids).logits, base(ids).logits
    assert torch.allclose(a, m, atol=1e-4) and not torch.allclose(a, b, atol=1e-3)
    with torch.no_grad(), adapted.disable_adapter():  # the base underneath was never trained
        assert torch.allclose(adapted(ids).logits, b, atol=1e-6)
    assert all(torch.equal(v, weights(tiny_model)[k]) for k, v in weights(tiny_model).items())
    train(cfg(tiny_model, tmp_path / "cut", **{**kw, "rollouts": 32}), log=lambda *_: None)
    train(build(TrainConfig, tmp_path / "cut" / "config.json", ["rollouts=64"]), resume=True, log=lambda *_: None)
    x, y = load_file(model / "adapter_model.safetensors"), load_file(tmp_path / "cut" / "model" / "adapter_model.safetensors")
    assert x.keys() == y.keys() and all(torch.allclose(x[k], y[k], atol=1e-6) for k in x)
    with pytest.raises(ValueError, match="config key 'teacher': ema"):
        cfg(tiny_model, tmp_path / "e", lora_r=4, teacher="ema").validate()
    from handrail.cli import main  # `handrail eval` takes the adapter folder as a model

    assert main(["eval", "--model", str(model), "--n", "4", "--samples", "0", "--json"]) == 0
    assert main(["decode", "--model", str(model), "--index", "0", "--max-new-tokens", "8"]) == 0


def test_a_data_runs_verifier_grades_the_rewards_and_the_evaluation(tiny_model, tmp_path, monkeypatch):
    """verifier=module:function reaches GRPO's reward and the held-out evaluation of a data run,
    on a GSM8K-style file read as it is: a verifier that accepts everything scores 100%."""
    from handrail.data.tasks import get_task

    problems = get_task("chain").split("train", 24, level=2)
    data = tmp_path / "gsm.jsonl"
    data.write_text("".join(json.dumps({"question": p.prompt, "answer": p.solution}) + "\n" for p in problems))
    (tmp_path / "yes_verifier.py").write_text(
        "calls = []\ndef check(completion, answer):\n    calls.append(answer)\n    return True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import yes_verifier

    out = tmp_path / "run"
    train(cfg(tiny_model, out, data=str(data), eval_data=str(data), verifier="yes_verifier:check", method="grpo",
              samples_per_prompt=4, prompts_per_step=4, rollouts=32, eval_n=0), log=lambda *_: None)
    log = rows(out)
    assert log[0]["eval/pass@1"] == 1.0 and all(r["reward/mean"] == 1.0 for r in log[1:])
    assert set(yes_verifier.calls) <= {p.answer for p in problems} and len(yes_verifier.calls) >= 32 + 24


def test_a_damaged_checkpoint_falls_back_to_the_one_before(tiny_model, tmp_path):
    from handrail.config import build

    out = tmp_path / "r"
    train(cfg(tiny_model, out, rollouts=32), log=lambda *_: None)  # 4 steps: checkpoints at 2 and 4
    assert json.loads((out / "checkpoint.prev" / "state.json").read_text())["step"] == 2
    (out / "checkpoint" / "optimizer.pt").write_bytes(b"damaged")
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss/to')  # a row half-written when the run was killed
    logs = []
    train(build(TrainConfig, out / "config.json", ["rollouts=48"]), resume=True, log=logs.append)
    assert any("damaged checkpoint file" in line and "optimizer.pt" in line and "step 2" in line for line in logs)
    assert [r["step"] for r in rows(out)] == list(range(7))


def test_a_run_stopped_before_its_first_checkpoint_starts_again(tiny_model, tmp_path):
    out = tmp_path / "r"
    out.mkdir()
    (out / "metrics.jsonl").write_text(json.dumps({"step": 0, "eval/pass@1": 0.0}) + "\n")
    logs = []
    train(cfg(tiny_model, out, rollouts=16, eval_every=0), log=logs.append)
    assert any("starting it again" in line for line in logs)
    assert [r["step"] for r in rows(out)] == [0, 1, 2]


def test_two_processes_equal_one(tiny_model, tmp_path):
    """Data-parallel (DDP) and sharded (fsdp=true, FSDP2 on gloo) training on two processes give
    one process's weights at the same global batch; a sharded run's checkpoint (full weights, its
    optimizer state in shards) and an unsharded one each resume on one process and sharded on two,
    all to the same weights."""
    common = ["--model", tiny_model, "--rollouts", "32", "prompts_per_step=8", "max_new_tokens=24",
              "eval_n=8", "train_n=64", "level=2", "eval_every=0", "lr=1e-3", "threads=1"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-m", "handrail.cli", "train", "--out", str(tmp_path / "one"), *common],
                   check=True, capture_output=True, env=env)
    for name, extra in (("two", []), ("fsdp", ["fsdp=true"])):
        p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                            "-m", "handrail.cli", "train", "--out", str(tmp_path / name), *common, *extra],
                           capture_output=True, text=True, env=env)
        assert p.returncode == 0, p.stderr[-3000:]
        assert p.stdout.count('"processes": 2') == 2  # two processes, one gloo group (not two lone runs)
        a, b = weights(tmp_path / "one" / "model"), weights(tmp_path / name / "model")
        assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a), (name, max((a[k] - b[k]).abs().max() for k in a))
        ra, rb = rows(tmp_path / "one"), rows(tmp_path / name)
        assert [r["tokens"] for r in ra] == [r["tokens"] for r in rb]
        assert ra[-1]["loss/total"] == pytest.approx(rb[-1]["loss/total"], rel=1e-4)
    # the sharded run's optimizer state is written shard by shard, never gathered into one file
    assert (tmp_path / "fsdp" / "checkpoint" / "optimizer" / ".metadata").is_file()
    assert not (tmp_path / "fsdp" / "checkpoint" / "optimizer.pt").exists()
    # each checkpoint resumes on one process and sharded on two, to the same weights
    for name in ("one", "fsdp"):
        shutil.copytree(tmp_path / name, tmp_path / f"{name}-sharded")
        p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "handrail.cli",
                            "train", "--resume", str(tmp_path / f"{name}-sharded"), "rollouts=48", "fsdp=true"],
                           capture_output=True, text=True, env=env)
        assert p.returncode == 0, p.stderr[-3000:]
        subprocess.run([sys.executable, "-m", "handrail.cli", "train", "--resume", str(tmp_path / name), "rollouts=48"],
                       check=True, capture_output=True, env=env)
    a = weights(tmp_path / "one" / "model")
    for name in ("fsdp", "one-sharded", "fsdp-sharded"):
        b = weights(tmp_path / name / "model")
        assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a), (name, max((a[k] - b[k]).abs().max() for k in a))
        assert rows(tmp_path / name)[-1]["step"] == 6


def test_sharded_bf16_trains_with_a_finite_loss(tiny_model, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "handrail.cli",
                        "train", "--model", tiny_model, "--out", str(tmp_path / "r"), "--rollouts", "16",
                        "prompts_per_step=8", "max_new_tokens=16", "eval_n=0", "train_n=32", "level=2", "threads=1",
                        "fsdp=true", "mixed_precision=bf16", "lr=1e-3"], capture_output=True, text=True, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    log = rows(tmp_path / "r")
    assert len(log) == 2 and all(math.isfinite(r["loss/total"]) and r["loss/grad_norm"] > 0 for r in log)
    w = weights(tmp_path / "r" / "model")
    assert all(t.dtype == torch.float32 for t in w.values())  # bf16 for compute; the weights stay fp32


def test_a_fresh_run_never_mixes_with_an_old_one(tiny_model, tmp_path):
    train(cfg(tiny_model, tmp_path / "r", rollouts=16, eval_every=0), log=lambda *_: None)
    before = (tmp_path / "r" / "metrics.jsonl").read_text()
    with pytest.raises(ValueError, match="already holds a run.*--resume"):
        train(cfg(tiny_model, tmp_path / "r", rollouts=16), log=lambda *_: None)
    assert (tmp_path / "r" / "metrics.jsonl").read_text() == before


def test_a_run_that_blows_up_stops_and_never_saves_nan(tiny_model, tmp_path):
    """lr=1e30 makes the first update's weights infinite: the run stops with a clear error, no
    checkpoint or final model with a non-finite weight exists, and metrics stay strict JSON."""
    from handrail.commands.train import NonFinite

    out = tmp_path / "r"
    with pytest.raises(NonFinite, match="no longer finite|non-finite"):
        train(cfg(tiny_model, out, lr=1e30, rollouts=64, checkpoint_every=1, eval_every=0), log=lambda *_: None)
    assert not (out / "model").exists()
    if (out / "checkpoint").exists():
        w = weights(out / "checkpoint" / "model")
        assert all(torch.isfinite(t).all() for t in w.values())
    for line in open(out / "metrics.jsonl"):
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))


def test_a_base_with_a_nan_weight_is_refused(tiny_model, tmp_path):

    from safetensors.torch import save_file

    from handrail.runtime.models import ModelError, load_model

    bad = tmp_path / "bad"
    shutil.copytree(tiny_model, bad)
    w = weights(bad)
    name = next(iter(w))
    w[name] = w[name].clone()
    w[name].view(-1)[0] = float("nan")
    save_file(w, str(bad / "model.safetensors"))
    with pytest.raises(ModelError, match="NaN or infinite"):
        load_model(str(bad))


def test_sigterm_stops_like_ctrl_c_and_the_run_resumes(tiny_model, tmp_path):
    """Also: while it runs, a second run on its folder is refused (naming its pid) and changes
    nothing; its log, written to a file, is whole lines; and --resume then finishes it."""
    import signal
    import time

    out = tmp_path / "r"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    args = [sys.executable, "-m", "handrail.cli", "train", "--model", tiny_model, "--out", str(out), "--rollouts",
            "4000", "prompts_per_step=8", "max_new_tokens=24", "eval_n=0", "train_n=64", "level=2",
            "checkpoint_every=2", "threads=1"]
    with open(tmp_path / "log.txt", "w") as log:
        p = subprocess.Popen(args, stderr=log, text=True, env=env)
        for _ in range(600):  # until the first checkpoint exists
            if (out / "checkpoint" / "state.json").exists():
                break
            time.sleep(0.1)
        rows_before = (out / "metrics.jsonl").read_text().count("\n")
        second = subprocess.run([sys.executable, "-m", "handrail.cli", "train", "--resume", str(out), "threads=1"],
                                capture_output=True, text=True, env=env)
        assert second.returncode == 2 and f"another run (pid {p.pid}) is using this folder" in second.stderr
        assert (out / "metrics.jsonl").read_text().count("\n") >= rows_before  # the holder goes on untouched
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=120)
    err = (tmp_path / "log.txt").read_text()
    assert p.returncode == 143 and "terminated (SIGTERM)" in err and "Traceback" not in err
    # a log file holds whole lines: no carriage returns, no empty lines, the closing message on its own
    assert "\r" not in err and "\n\n" not in err and err.endswith("\n")
    assert any(line.startswith("handrail train: terminated (SIGTERM)") for line in err.splitlines())
    step = json.loads((out / "checkpoint" / "state.json").read_text())["step"]
    assert step >= 2
    done = subprocess.run([sys.executable, "-m", "handrail.cli", "train", "--resume", str(out),
                           f"rollouts={(step + 2) * 8}"], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert [r["step"] for r in rows(out)] == list(range(1, step + 3))  # on from the checkpoint, no step twice
    assert (out / "model" / "config.json").exists()


# checkpointing: the model's forward (recomputed) against the lean one, equal to float rounding. The
# gradient's norm agrees to ~5e-7; the loss, a KL near 6e-5 (the mean of many nearly cancelling
# terms), to ~5e-5 relative under AVX2 (AVX-512 stayed under 1e-5)
@pytest.mark.parametrize("kw,tol,grad_tol", [(dict(grad_checkpointing=True), 2e-4, 1e-5),
                                             (dict(mixed_precision="bf16"), 0.05, 0.1)])
def test_checkpointing_and_bf16_stay_close_to_fp32(tiny_model, tmp_path, kw, tol, grad_tol, monkeypatch):
    """Gradient checkpointing changes nothing but memory (and does recompute: each layer runs
    twice with gradients on, once in forward and once in backward); bf16 autocast gives a finite
    loss within a few percent of fp32's on the same rollouts (sampling is not autocast, so they
    are the same)."""
    from transformers.models.llama import modeling_llama

    # counted inside a layer: transformers checkpoints the layer's own forward, so that must stay
    calls, forward = {"n": 0}, modeling_llama.LlamaMLP.forward

    def counted(self, *a, **k):
        calls["n"] += torch.is_grad_enabled()
        return forward(self, *a, **k)

    monkeypatch.setattr(modeling_llama.LlamaMLP, "forward", counted)
    base = dict(rollouts=16, eval_n=0, checkpoint_every=0, lr=1e-3)
    train(cfg(tiny_model, tmp_path / "fp32", **base), log=lambda *_: None)
    if kw.get("grad_checkpointing"):
        # the default training forward is the lean one (decoder.hidden_states), which runs no module;
        # the model's own forward, as checkpointing takes, without the recompute:
        import handrail.engine.decoder as D

        with monkeypatch.context() as m:
            m.setattr(D, "checkpointing", lambda model: True)
            calls["n"] = 0
            train(cfg(tiny_model, tmp_path / "model-forward", **base), log=lambda *_: None)
        plain, calls["n"] = calls["n"], 0
        train(cfg(tiny_model, tmp_path / "other", **base, **kw), log=lambda *_: None)
        assert plain > 0 and calls["n"] == 2 * plain
    else:
        train(cfg(tiny_model, tmp_path / "other", **base, **kw), log=lambda *_: None)
    a, b = rows(tmp_path / "fp32")[0], rows(tmp_path / "other")[0]
    assert torch.isfinite(torch.tensor(b["loss/total"])) and b["loss/total"] > 0
    assert b["loss/total"] == pytest.approx(a["loss/total"], rel=tol)
    assert b["loss/grad_norm"] == pytest.approx(a["loss/grad_norm"], rel=grad_tol)
    if kw.get("mixed_precision") == "bf16":  # it did run in bf16: not bit-equal to fp32
        assert b["loss/total"] != a["loss/total"]


def test_srpo_keeps_one_frozen_copy(tiny_model):
    """With a KL reference and a frozen teacher, both are the same initial model: one copy."""
    from handrail.methods import SRPO
    from handrail.runtime.models import load_model
    from handrail.data.tasks import get_task

    lm, tok, templates = load_model(tiny_model)
    srpo = SRPO(cfg(tiny_model, "unused", method="srpo", samples_per_prompt=4, prompts_per_step=1, kl_coef=0.05),
                lm, tok, templates, get_task("chain"))
    assert srpo.grpo.reference is srpo.distill.teacher and srpo.grpo.reference is not lm


def test_expert_iteration_counts_every_searched_sequence(tiny_model, tmp_path):
    """The search's samples are the budget: the run stops at the first step that spends it, and
    the policy learns from the visit counts (its weights move)."""
    from handrail.data.tasks import get_task

    data = tmp_path / "d.jsonl"  # a data file: steps are checked for form only, so the tiny model has some
    data.write_text("".join(json.dumps({"prompt": p.prompt, "solution": p.solution}) + "\n"
                            for p in get_task("chain").split("train", 32, level=2)))
    out = tmp_path / "r"
    train(cfg(tiny_model, out, data=str(data), method="expert-iteration", prompts_per_step=2, search_simulations=2,
              search_candidates=2, rollouts=60, eval_every=0, eval_n=0, checkpoint_every=0), log=lambda *_: None)
    log = rows(out)
    assert all(r["search/sequences"] > 0 for r in log)
    assert log[-1]["rollouts"] >= 60 and (len(log) == 1 or log[-2]["rollouts"] < 60)
    assert [r["rollouts"] for r in log] == sorted({r["rollouts"] for r in log})  # strictly growing
    assert any(r["search/rows"] > 1 for r in log)
    before, after = weights(tiny_model), weights(out / "model")
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_optimizer_state_keys_translate_both_ways_even_before_a_step():
    from handrail.runtime.sharding import by_name, by_position

    policy = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    policy[0].bias.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad])
    for stepped in (False, True):
        if stepped:
            policy(torch.ones(1, 3)).sum().backward()
            opt.step()
        state = opt.state_dict()
        named = by_name(policy, state)
        assert named["param_groups"][0]["params"] == ["0.weight", "1.weight", "1.bias"]
        assert set(named["state"]) == ({"0.weight", "1.weight", "1.bias"} if stepped else set())
        back = by_position(policy, named)
        assert back["param_groups"][0]["params"] == state["param_groups"][0]["params"]
        assert back["state"].keys() == state["state"].keys()
        assert by_name(policy, named) is named and by_position(policy, state) is state


def test_the_shipped_config_presets_build():
    """configs/*.yaml are what README points to: each must be a valid TrainConfig preset."""
    from pathlib import Path

    from handrail.config import build

    presets = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))
    assert {p.name for p in presets} >= {"self_distill.yaml", "fsdp.yaml"}
    for p in presets:
        built = build(TrainConfig, p, ["model=x"])
        assert built.model == "x"
    assert build(TrainConfig, presets[[p.name for p in presets].index("fsdp.yaml")], ["model=x"]).fsdp is True


def test_the_counterfactual_teacher_reads_another_problems_reference(tiny_model):
    """Each row's counterfactual prompt is its own problem with the next distinct problem's
    reference, and the target built from it differs from the plain teacher's."""
    from handrail.data.records import records_from_task, teacher_prompt
    from handrail.methods import METHODS, World
    from handrail.runtime.models import load_model
    from handrail.engine.rollout import given_rollout
    from handrail.data.tasks import get_task

    lm, tok, tpl = load_model(tiny_model)
    recs = records_from_task(get_task("chain").split("train", 3, 2, seed=0))
    batch = [recs[0], recs[0], recs[1], recs[2]]  # a repeated problem gets the same wrong reference
    conf = TrainConfig(model=tiny_model, counterfactual="shuffled", prompts_per_step=4)
    method = METHODS["self-distill"](conf, lm, tok, tpl, get_task("chain"))
    wrong = [tok.decode(ids) for ids in method.counterfactual_prompts(batch)]
    assert wrong[0] == wrong[1] == teacher_prompt(tok, recs[0], tpl, recs[1].solution)
    assert wrong[2] == teacher_prompt(tok, recs[1], tpl, recs[2].solution)
    assert wrong[3] == teacher_prompt(tok, recs[2], tpl, recs[0].solution)
    rollout = given_rollout(tok, method.prompts(batch), [r.solution for r in batch])
    signal = method.score(batch, rollout, lm, World())
    assert signal.counterfactual is not None and signal.initial is not None
    assert not torch.equal(signal.counterfactual[0], signal.teacher[0])
    with pytest.raises(ValueError, match="prompts_per_step must be at least 2"):
        TrainConfig(model=tiny_model, counterfactual="shuffled", prompts_per_step=1).validate()


def test_guided_rollouts_for_the_first_part_of_training_only(tiny_model):
    from handrail.data.records import records_from_task
    from handrail.methods import METHODS
    from handrail.runtime.models import load_model
    from handrail.data.tasks import get_task

    lm, tok, tpl = load_model(tiny_model)
    recs = records_from_task(get_task("chain").split("train", 2, 2, seed=0))
    conf = TrainConfig(model=tiny_model, rollout="guided", guided_until=0.25)
    method = METHODS["self-distill"](conf, lm, tok, tpl, get_task("chain"))
    assert method.guide(recs, lm, 0.0) is not None and method.guide(recs, lm, 0.2) is not None
    assert method.guide(recs, lm, 0.25) is None and method.guide(recs, lm, 0.9) is None
    plain = METHODS["self-distill"](TrainConfig(model=tiny_model), lm, tok, tpl, get_task("chain"))
    assert plain.guide(recs, lm, 0.0) is None


def test_counterfactual_auto_turns_on_only_for_a_teacher_that_states_the_answer_first(tiny_model, monkeypatch):
    """The default `counterfactual=auto` reads the teacher's and the student's leak rates (greedy,
    on training records) and turns the counterfactual teacher on only when the teacher's is higher
    beyond chance; methods with no teacher target, or one problem a step, never get it."""
    import handrail.commands.train as T
    from handrail.data.records import records_from_task
    from handrail.data.tasks import get_task

    recs = records_from_task(get_task("chain").split("train", 32, 2, seed=0))
    leaks = {}
    monkeypatch.setattr(T, "evaluate", lambda m, tok, tpl, rs, hint, **kw: {"leak_rate": leaks[hint]})
    said = []
    conf = TrainConfig(model=tiny_model)
    for student, teacher, expected in ((0.0, 0.5, "shuffled"), (0.0, 0.03, "none"), (0.4, 0.5, "none"),
                                       (0.1, 0.1, "none")):
        leaks.update(none=student, solution=teacher)
        assert T.resolve_counterfactual(conf, None, None, None, recs, None, said.append) == expected
    assert "50% of 32" in said[0] and said[0].endswith("(only what the right reference adds over another problem's is distilled)")
    leaks.update(none=0.0, solution=1.0)
    for other in (dict(method="sft"), dict(method="grpo"), dict(prompts_per_step=1)):
        assert T.resolve_counterfactual(TrainConfig(model=tiny_model, **other), None, None, None, recs, None,
                                        said.append) == "none"
    assert T.resolve_counterfactual(conf, None, None, None, recs[:1] * 5, None, said.append) == "none"


def test_counterfactual_auto_leaves_a_run_it_turns_off_unchanged_to_the_bit(tiny_model, tmp_path):
    """The check samples greedily in a forked RNG, so a run where auto resolves to none trains the
    same weights as counterfactual=none; config.json records what ran, not 'auto'."""
    said = []
    train(cfg(tiny_model, tmp_path / "auto", rollouts=16, eval_n=0), log=said.append)
    train(cfg(tiny_model, tmp_path / "none", rollouts=16, eval_n=0, counterfactual="none"), log=lambda *_: None)
    assert any(line.startswith("counterfactual=auto: ") and line.endswith("counterfactual=none") for line in said)
    assert json.load(open(tmp_path / "auto" / "config.json"))["counterfactual"] == "none"
    a, b = weights(tmp_path / "auto" / "model"), weights(tmp_path / "none" / "model")
    assert all(torch.equal(a[k], b[k]) for k in a)
