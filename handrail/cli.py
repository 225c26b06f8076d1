"""The `handrail` command. Each subcommand fills one config dataclass (flags, then an optional
YAML preset via --config, then trailing key=value overrides) and calls one library function.
Bad input ends with a one-line message on stderr and exit status 2, never a traceback."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys

from handrail.errors import UsageError
from handrail import config as C


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (no usage block), like every other error."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _count(low: int):
    """An argparse type: a whole number >= `low`, named in the error by argparse."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {low}, got {value}")
        return value
    return parse


def _common(p: argparse.ArgumentParser, model: bool = True) -> None:
    if model:
        p.add_argument("--model", required=True, help="HF folder or hub id, a .gguf file, or 'smollm2'")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--task", help="embedded task (default: chain)")
    src.add_argument("--data", help="JSONL / CSV / TSV / Parquet / saved datasets folder")
    p.add_argument("--config", help="YAML file of config keys")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")


def cmd_pretrain(a) -> int:
    from handrail.commands.pretrain import PretrainConfig, pretrain
    from handrail.folders import check_out

    cfg = C.build(PretrainConfig, a.config, a.overrides, out=a.out, task=a.task, data=a.data, seed=a.seed)
    check_out(cfg.out)
    pretrain(cfg)  # writes pretrain_config.json and pretrain_result.json beside the model
    return 0


def _problems(a):
    """(task, records) for eval and search, with errors naming their flags, not config keys."""
    from handrail.commands.sources import eval_records

    try:
        return eval_records(a.task, a.data, a.level, a.n, a.fields, a.verifier)
    except ValueError as e:
        raise C.ConfigError(str(e).replace("config key 'verifier'", "--verifier")
                            .replace("config key 'fields'", "--fields")) from None


def cmd_eval(a) -> int:
    from handrail.runtime.evaluate import evaluate, fit_records, prompt_limit
    from handrail.runtime.models import load_model
    from handrail.commands.sources import model_folder
    if a.temperature < 0:
        raise C.ConfigError(f"--temperature: {a.temperature} is out of range (>= 0)")
    if a.overrides or a.config:  # eval has flags only: refuse what it would otherwise ignore
        raise C.ConfigError(f"{a.overrides[0] if a.overrides else '--config'}: eval takes flags only "
                            f"(see handrail eval --help), not config keys")
    _output_file("--completions", a.completions, "evaluating")
    task, records = _problems(a)
    model, tokenizer, templates = load_model(model_folder(a.model), templates=a.templates)
    records = fit_records(tokenizer, records, templates, prompt_limit(model, a.max_new_tokens), a.truncate, (a.hint,))
    completions = [] if a.completions else None
    res = evaluate(model, tokenizer, templates, records, task=task, hint=a.hint, samples=a.samples,
                   max_new_tokens=a.max_new_tokens, batch_size=a.batch_size,
                   temperature=a.temperature, seed=a.seed, completions=completions)
    if a.completions:
        with open(a.completions, "w") as f:
            f.writelines(json.dumps(c) + "\n" for c in completions)
    if a.json:
        print(json.dumps(res))
    else:
        sampled = "n/a" if res["accuracy_sampled"] is None else f"{res['accuracy_sampled']:.1%}"
        print(f"pass@1 greedy {res['accuracy']:.1%} strict, {res['accuracy_lenient']:.1%} lenient | "
              f"sampled {sampled} ({a.samples} per problem) | "
              f"leak rate {res['leak_rate']:.1%} | n={res['n']} | hint={a.hint} | "
              f"{res['tokens']} tokens in {res['seconds']:.1f}s")
    return 0


def _output_file(flag: str, path: str | None, what: str) -> None:
    """Refuse an output file path that cannot be written, before the work that fills it."""
    if path and (os.path.isdir(path) or not os.path.isdir(os.path.dirname(os.path.abspath(path)))):
        raise C.ConfigError(f"{flag}: {path} is a folder, or its folder does not exist; give a file path "
                            f"(checked before {what}, so no work is lost)")


def cmd_probe(a) -> int:
    from handrail.commands.probe import probe, table
    from handrail.commands.train import TrainConfig

    _output_file("--html", a.html, "probing")
    cfg = C.build(TrainConfig, a.config, a.overrides, model=a.model, task=a.task, data=a.data)
    report = probe(cfg, n=a.n, html_attempts=a.html_attempts if a.html else 0,
                   log=(lambda *_: None) if a.json else (lambda m: print(m, file=sys.stderr)))
    if a.html:
        from handrail.commands.probe_html import write

        write(report, a.html)
    if a.json:
        print(json.dumps(report))
    else:
        print(table(report))
        if a.html:
            print(f"page: {a.html}")
    return 0


def cmd_search(a) -> int:
    from handrail.runtime.evaluate import fit_records, prompt_limit
    from handrail.runtime.models import load_model
    from handrail.commands.sources import model_folder
    from handrail.folders import progress
    from handrail.methods.search import SearchConfig, search, value_mode

    if a.overrides or a.config:
        raise C.ConfigError(f"{a.overrides[0] if a.overrides else '--config'}: search takes flags only "
                            f"(see handrail search --help), not config keys")
    for flag, value, ok in (("--temperature", a.temperature, a.temperature > 0), ("--c-puct", a.c_puct, a.c_puct >= 0)):
        if not ok:
            raise C.ConfigError(f"{flag}: {value} is out of range ({'> 0' if flag == '--temperature' else '>= 0'})")
    if not a.delimiter:
        raise C.ConfigError("--delimiter: must not be empty")
    _output_file("--out", a.out, "searching")
    task, records = _problems(a)
    value = value_mode(task, a.value or "")  # checked here, before the model loads and the search starts
    cfg = SearchConfig(simulations=a.simulations, candidates=a.candidates, c_puct=a.c_puct, value=value,
                       max_new_tokens=a.max_new_tokens, temperature=a.temperature,
                       delimiter=a.delimiter.encode().decode("unicode_escape"), batch_size=a.batch_size)
    model, tokenizer, templates = load_model(model_folder(a.model), templates=a.templates)
    records = fit_records(tokenizer, records, templates, prompt_limit(model, a.max_new_tokens), "error", ("none",))
    if value == "answer" and not a.json:
        print("note: --value answer scores rollouts against the reference answer: an oracle, an upper bound "
              "rather than a test-time result", file=sys.stderr)
    bar = progress(len(records), "best-of-n" if a.best_of else "search", "problem")
    summary, rows = search(model, tokenizer, templates, records, task, cfg, best_of=a.best_of, seed=a.seed,
                           progress=bar)
    bar.close()
    if a.out:
        with open(a.out, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    if a.json:
        print(json.dumps(summary))
    else:
        print(f"{summary['method']}: accuracy {summary['accuracy']:.1%} | "
              f"{summary['tokens_per_problem']:.0f} generated tokens per problem | n={summary['n']} | value={value}")
    return 0


def cmd_train(a) -> int:
    from handrail.folders import check_out
    from handrail.commands.train import TrainConfig, train

    flags = {k: getattr(a, k) for k in ("model", "task", "data", "method", "rule", "teacher",
                                         "rollouts", "seed", "out", "config")}
    if a.resume:
        given = next((k for k, v in flags.items() if v is not None), None)
        if given:  # the run's own config.json decides; say so instead of ignoring the flag
            raise C.ConfigError(f"--{given}: not used with --resume (the run's config.json is); "
                                f"change a key with key=value after --resume DIR")
        saved = os.path.join(a.resume, "config.json")
        if not os.path.exists(saved):
            raise FileNotFoundError(f"{a.resume}: not a run folder (no config.json)")
        cfg = C.build(TrainConfig, saved, a.overrides, out=a.resume)
    else:
        cfg = C.build(TrainConfig, flags.pop("config"), a.overrides, **flags)
        check_out(cfg.out)
    print(json.dumps(train(cfg, resume=bool(a.resume))))
    return 0


def cmd_compare(a) -> int:
    from handrail.commands.compare import CompareConfig, compare
    from handrail.commands.sources import default_base_model
    from handrail.folders import check_out
    from handrail.data.tasks import DEFAULT_TASK

    if not a.model and (a.data or a.task not in (None, DEFAULT_TASK)):
        raise UsageError("--model is required unless the task is the embedded default")
    model = a.model or "default"
    flags = dict(model=model, task=a.task, data=a.data, methods=a.methods, rollouts=a.rollouts,
                 seeds=a.seeds, out=a.out)
    cfg = C.build(CompareConfig, a.config, a.overrides, **flags)
    check_out(cfg.out)
    if model == "default":
        default_base_model()  # built (or found) before any run starts, with its progress shown
    compare(cfg)
    return 0


def cmd_demo(a) -> int:
    from handrail.commands.compare import CompareConfig, compare
    from handrail.commands.sources import default_base_model
    from handrail.folders import check_out

    out = a.out or _free_dir("runs/demo-quick" if a.quick else "runs/demo")
    check_out(out)
    base = default_base_model(rebuild=a.rebuild, quick=a.quick)
    cfg = CompareConfig(model=str(base) if a.quick else "default", out=out, **(DEMO_QUICK if a.quick else DEMO))
    compare(cfg)
    return 0


# The demo: every method on every scenario of the lab (README: "Embedded tasks and the lab"), from the default base, each
# at the learning rate it does best with on the validation split. 3e-4 was swept too and never
# chosen (GRPO collapses there: BENCHMARKS.md §L2); leaving it out keeps the demo under 15 min.
DEMO = dict(methods="self-distill,self-distill:none,sft,grpo", scenarios="full,terse,answer",
            rollouts=1024, seeds=3, eval_points=4, sweep="lr=3e-5,1e-4")
# the quick base solves too little for the answer scenario's bootstrap stage to keep anything
DEMO_QUICK = dict(methods="self-distill,self-distill:none,sft,grpo", scenarios="full,terse",
                  rollouts=32, seeds=1, eval_points=1, train="eval_n=40,max_new_tokens=40")


def cmd_decode(a) -> int:
    from handrail.data.records import Record
    from handrail.runtime.evaluate import prompt_ids
    from handrail.runtime.models import load_model, stop_ids
    from handrail.commands.sources import model_folder
    from handrail.engine.rollout import Guide, sample
    from handrail.commands.sources import eval_records
    from handrail.engine.targets import NEEDS_INITIAL, RULES, make_rule

    usable = [r for r in RULES if r not in NEEDS_INITIAL]
    if a.rule not in usable:
        raise C.ConfigError(f"--rule: unknown {a.rule!r} for decode; choose {', '.join(usable)}")
    for flag, value, ok in (("--delta", a.delta, a.delta >= 0), ("--lam", a.lam, 0 <= a.lam <= 1),
                            ("--top-p", a.top_p, 0 < a.top_p <= 1), ("--temperature", a.temperature, a.temperature >= 0)):
        if not ok:
            raise C.ConfigError(f"{flag}: {value} is out of range")
    model, tok, tpl = load_model(model_folder(a.model), templates=a.templates)
    if a.prompt:
        if not a.solution:
            raise UsageError("--prompt needs --solution (the reference the teacher sees)")
        rec, task = Record(a.prompt, a.solution), None
    else:
        task, recs = eval_records(a.task, None, a.level, a.index + 1)
        rec = recs[a.index]
    rule = make_rule(a.rule, lam=a.lam, delta=a.delta, top_p=a.top_p)
    ids, t_ids = prompt_ids(tok, [rec], tpl), prompt_ids(tok, [rec], tpl, hint="solution")
    kw = dict(max_new_tokens=a.max_new_tokens, stop_ids=stop_ids(tok), temperature=a.temperature, seed=a.seed)
    plain = sample(model, tok, ids, **kw).texts[0]
    guided = sample(model, tok, ids, guide=Guide(model, t_ids, rule), **kw).texts[0]
    print(f"problem:   {rec.text}")
    for name, text in (("student", plain), (f"guided ({a.rule})", guided)):
        verdict = ""
        if task is not None:
            verdict = "  [correct]" if task.verify(text, rec.answer) else "  [wrong]"
        print(f"--- {name}{verdict}\n{text}")
    return 0


def _free_dir(base: str) -> str:
    """`base`, or `base-2`, `base-3`, ...: the first that does not exist yet (results are kept)."""
    n, path = 1, base
    while os.path.exists(path):
        n += 1
        path = f"{base}-{n}"
    return path


def _pretrain_command(sub) -> None:
    p = sub.add_parser("pretrain", help="build a tiny base model from scratch on a task or data file")
    _common(p, model=False)
    p.add_argument("--out", required=True, help="output model folder")
    p.add_argument("--seed", type=int)
    p.set_defaults(fn=cmd_pretrain)


def _eval_command(sub) -> None:
    p = sub.add_parser("eval", help="held-out pass@1 (greedy and sampled) and leak rate")
    _common(p)
    p.add_argument("--hint", default="none", choices=["none", "solution", "answer"])
    p.add_argument("--samples", type=_count(0), default=1, help="sampled completions per problem (0: greedy only)")
    p.add_argument("--level", type=_count(1), help="task difficulty (default: the task's post-training level)")
    p.add_argument("--n", type=_count(1), default=200, help="problems to evaluate")
    p.add_argument("--max-new-tokens", type=_count(1), default=128)
    p.add_argument("--batch-size", type=_count(1), default=64)
    p.add_argument("--templates", help="JSON file with 'student' and 'teacher' prompt templates")
    p.add_argument("--truncate", default="error", choices=["error", "left"],
                   help="a prompt longer than the model's positions: error (naming it) or keep its end")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fields", help="data: other field names, e.g. prompt=query,solution=target "
                                    "(question/answer with ####, and problem/solution with \\boxed{}, need none)")
    p.add_argument("--verifier", default="exact", help="data: exact (default) | math (math-verify) | module:function")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--completions", metavar="FILE",
                   help="also write each problem's greedy completion as JSONL (problem, completion, correct, leak, answer)")
    p.set_defaults(fn=cmd_eval)


def _probe_command(sub) -> None:
    p = sub.add_parser("probe", help="before training: can the privileged teacher help this model on this data, and why")
    _common(p)
    p.add_argument("--n", type=_count(2), default=64, help="held-out records to probe")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--html", metavar="FILE", help="also write a page showing the student's attempts token by token")
    p.add_argument("--html-attempts", type=_count(1), default=6, help="attempts drawn in the --html page")
    p.set_defaults(fn=cmd_probe)


def _search_command(sub) -> None:
    p = sub.add_parser("search", help="step-level pUCT search at test time (or best-of-N at the same accounting)")
    _common(p)
    p.add_argument("--simulations", type=_count(1), default=8, help="simulations per move")
    p.add_argument("--candidates", type=_count(1), default=4, help="next steps sampled per expansion")
    p.add_argument("--c-puct", type=float, default=1.0, help="exploration weight of the prior")
    p.add_argument("--value", choices=["check", "answer"],
                   help="check: the task's program check, no answer (embedded tasks; default) | "
                        "answer: the reference answer (data files; an oracle at test time)")
    p.add_argument("--best-of", type=_count(0), default=0, metavar="N",
                   help="instead of searching, sample up to N completions per problem (stop at the first that passes the check)")
    p.add_argument("--delimiter", default="\\n", help="what ends a step (escapes such as \\n are read)")
    p.add_argument("--level", type=_count(1), help="task difficulty (default: the task's post-training level)")
    p.add_argument("--n", type=_count(1), default=200, help="problems")
    p.add_argument("--max-new-tokens", type=_count(1), default=96)
    p.add_argument("--batch-size", type=_count(1), default=64, help="problems searched at once")
    p.add_argument("--templates", help="JSON file with 'student' and 'teacher' prompt templates")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fields", help="data: other field names, e.g. prompt=query,solution=target")
    p.add_argument("--verifier", default="exact", help="data: exact (default) | math (math-verify) | module:function")
    p.add_argument("--out", help="also write one JSON line per problem (completion, correct, tokens) here")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(fn=cmd_search)


def _train_command(sub) -> None:
    p = sub.add_parser("train", help="post-train a model (self-distill, grpo or sft)")
    _common(p, model=False)
    p.add_argument("--model", help="HF folder or hub id, a .gguf file, or 'smollm2'")
    p.add_argument("--method", help="self-distill (default), grpo, sft, or any other registered in handrail/methods/ "
                                    "(an unknown name is answered with the list)")
    p.add_argument("--rule", help="aggregation rule: trust-region (default) | geometric | support | none")
    p.add_argument("--teacher", help="frozen (default) | live | ema")
    p.add_argument("--rollouts", type=_count(1), help="budget of sampled student completions")
    p.add_argument("--seed", type=int)
    p.add_argument("--out", help="run folder")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint")
    p.set_defaults(fn=cmd_train)


def _compare_command(sub) -> None:
    p = sub.add_parser("compare", help="methods side by side: same base, budget, seeds and eval points")
    _common(p, model=False)
    p.add_argument("--model", help="base model (default: the embedded default, built if missing)")
    p.add_argument("--methods", help="comma-separated, e.g. self-distill,grpo,sft,self-distill:none")
    p.add_argument("--rollouts", type=_count(1), help="samples per run")
    p.add_argument("--seeds", type=_count(1))
    p.add_argument("--out", help="results folder")
    p.set_defaults(fn=cmd_compare)


def _decode_command(sub) -> None:
    p = sub.add_parser("decode", help="guided decoding: each token from the aggregate of student and teacher")
    p.add_argument("--model", required=True, help="HF folder or hub id, a .gguf file, or 'smollm2'")
    p.add_argument("--prompt", help="the problem (default: a held-out problem of --task)")
    p.add_argument("--solution", help="the reference the teacher sees (with --prompt)")
    p.add_argument("--task", help="embedded task for the default problem (default: chain)")
    p.add_argument("--level", type=_count(1), help="task difficulty (default: the post-training level)")
    p.add_argument("--index", type=_count(0), default=0, help="which held-out problem")
    p.add_argument("--rule", default="trust-region", help="aggregation rule (targets.RULES; those that need no initial model)")
    p.add_argument("--templates", help="JSON file with 'student' and 'teacher' prompt templates")
    p.add_argument("--delta", type=float, default=1.0)
    p.add_argument("--lam", type=float, default=0.5)
    p.add_argument("--top-p", type=float, default=0.9, help="support rule: the student's nucleus")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy on the aggregate")
    p.add_argument("--max-new-tokens", type=_count(1), default=128)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=cmd_decode)


def _demo_command(sub) -> None:
    p = sub.add_parser("demo", help="the main job: default base model, then self-distill, SFT and GRPO on the lab's scenarios")
    p.add_argument("--rebuild", action="store_true", help="rebuild the cached base model")
    p.add_argument("--quick", action="store_true", help="a small base and budget (about 2 minutes)")
    p.add_argument("--out", help="results folder (default: runs/demo)")
    p.set_defaults(fn=cmd_demo)


def parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="handrail", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    for command in (_pretrain_command, _eval_command, _probe_command, _search_command, _train_command,
                    _compare_command, _decode_command, _demo_command):
        command(sub)
    return ap


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """The parser's reading of argv, with key=value overrides accepted anywhere on the line
    (`--method grpo lr=1e-3 --rollouts 64 samples_per_prompt=4`): argparse alone takes one run of
    positionals and calls the rest unrecognised."""
    ap = parser()
    a, rest = ap.parse_known_args(argv)
    keys = [r for r in rest if re.match(r"[A-Za-z_]\w*=", r)]
    if len(keys) < len(rest) or (keys and not hasattr(a, "overrides")):
        ap.error(f"unrecognized arguments: {' '.join(r for r in rest if r not in keys or not hasattr(a, 'overrides'))}")
    if keys:
        a.overrides = list(a.overrides) + keys
    return a


def main(argv: list[str] | None = None) -> int:
    from handrail.folders import WriteError
    from handrail.commands.train import NonFinite

    a = parse(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    signal.signal(signal.SIGTERM, _terminated)  # what schedulers send: stop as Ctrl-C does
    try:  # a signal during the imports below ends like one during training (benchmarks/soak.py found it)
        _quiet_libraries()
        return a.fn(a)
    except WriteError as e:  # a full disk, a read-only or over-quota filesystem: nothing half-written is left
        print(f"handrail {a.command}: error: {_one_line(e)}", file=sys.stderr)
        return 4
    except (UsageError, FileNotFoundError) as e:  # a user's mistake; any other exception is a bug: its traceback
        print(f"handrail {a.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except NonFinite as e:
        print(f"handrail {a.command}: error: {_one_line(e)}", file=sys.stderr)
        return 3
    except KeyboardInterrupt as e:
        why = "terminated (SIGTERM)" if isinstance(e, _Terminated) else "interrupted"
        print(f"handrail {a.command}: {why}; a run continues from its last checkpoint with --resume",
              file=sys.stderr)
        return 143 if isinstance(e, _Terminated) else 130


def _quiet_libraries() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # keep --json output and logs clean
    hf_logging.set_verbosity_error()
    import warnings

    # deprecation notices inside the libraries speak to their callers' authors, not to a user's log
    for module in ("transformers", "peft", "accelerate", "torch"):
        warnings.filterwarnings("ignore", category=FutureWarning, module=module)


def _one_line(e: Exception) -> str:
    """A message from a library may span lines; a log or a script reads one."""
    text = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
    return text if len(text) <= 400 else text[:400] + " ..."


class _Terminated(KeyboardInterrupt):
    pass


def _terminated(signum, frame):
    raise _Terminated()


if __name__ == "__main__":
    sys.exit(main())
