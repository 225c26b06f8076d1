"""`handrail compare`: every method from the same base model, at the same budget, evaluated on
the same held-out problems at the same points, over several seeds.

Budgets are in samples: a rollout (one sampled student completion) for on-policy methods, one
reference solution for SFT, so every method consumes `rollouts_per_step` per step and the
evaluation points line up. Each *scenario* (SCENARIOS: what the references look like, or how
hard the level is) runs every method. Writes `results.json`, `accuracy.png` (held-out pass@1 and
leak rate against samples, mean ± spread over seeds, one column per scenario), `table.md` and
`environment.json` (commit, versions, CPU instruction set, the base's recipe), and prints the
sample-efficiency ratio (`ratio`, self-distillation against GRPO by default): rollouts the
baseline needs to reach its best accuracy ÷ rollouts the method needs to reach the same.
"""

from __future__ import annotations

import json
import os
import statistics
from dataclasses import dataclass
from pathlib import Path

from handrail.errors import UsageError
from handrail import config as C
from handrail.errors import first_line
from handrail.commands.train import TrainConfig, train
from handrail.folders import FolderLock, progress, writing


@dataclass
class CompareConfig:
    model: str = ""  # base model every method starts from
    out: str = "runs/compare"
    task: str | None = None
    data: str | None = None
    eval_data: str | None = None
    fields: str | None = None  # data: other field names, "prompt=question,solution=answer"
    verifier: str = "exact"  # data: exact | math | module:function
    methods: str = "self-distill,grpo,sft"  # comma-separated method[:rule[:rollout]][+key=value...], e.g. self-distill::guided, self-distill+gate=none
    rollouts: int = 1024  # samples per run (rollouts, or reference examples for sft)
    seeds: int = 3
    samples_per_step: int = 16  # global samples per step, for every method
    group_size: int = 4  # GRPO's G: prompts per step = samples_per_step / G
    eval_points: int = 8  # evaluations per run, at the same sample counts for every method
    scenarios: str = "full"  # comma-separated, from SCENARIOS: full | terse | answer | hard | shuffled | terse-shuffled | noref
    score: str = "strict"  # what the table, the sweep and the ratio judge by: strict (the verifier's format) | lenient (the answer where a reader finds it); the table shows both
    jobs: int = 0  # runs trained at once, each on one thread (0: one per CPU core; GPU runs: use 1)
    train: str = ""  # extra TrainConfig overrides for every run, "key=value,key=value"
    sweep: str = ""  # "key=v1,v2,..." (e.g. lr=1e-5,3e-5,1e-4,3e-4): each method and scenario first tries every value on a validation split and then runs at its best
    sweep_seeds: int = 1  # seeds per swept value (they differ from the comparison's seeds)
    val_data: str | None = None  # with --data and sweep: the validation records (never the test file)
    ratio: str = "self-distill/grpo"  # the sample-efficiency ratio METHOD/BASELINE: rollouts the baseline needs to reach its best accuracy over rollouts the method needs to reach it ("": none)

    RANGES = {"rollouts": "[1, )", "seeds": "[1, )", "samples_per_step": "[1, )", "group_size": "[1, )",
              "eval_points": "[1, )", "jobs": "[0, )", "sweep_seeds": "[1, )"}
    CHOICES = {"score": ("strict", "lenient")}

    def validate(self):
        if not self.model:
            raise UsageError("config key 'model': required")
        if self.samples_per_step % self.group_size:
            raise UsageError("samples_per_step must be a multiple of group_size")
        for name in self.scenarios.split(","):
            if name not in SCENARIOS:
                raise UsageError(f"config key 'scenarios': unknown {name!r}; choose {', '.join(SCENARIOS)}")
        if self.data and set(self.scenarios.split(",")) - {"full", "answer", "shuffled", "noref"}:
            raise UsageError("config key 'scenarios': with --data only full (the file as it is), answer (its "
                             "solutions dropped), shuffled and noref apply; put terse or harder records in the file itself")
        if self.sweep and self.data and not self.val_data:
            raise UsageError("config key 'val_data': a sweep on --data needs validation records of its own "
                             "(hyperparameters are never chosen on the test records)")
        if self.ratio:
            from handrail.methods import METHODS

            pair = self.ratio.split("/")
            if len(pair) != 2 or not set(pair) <= set(METHODS):
                raise UsageError(f"config key 'ratio': {self.ratio!r} is not METHOD/BASELINE with methods from "
                                 f"{', '.join(METHODS)} (e.g. self-distill/grpo; \"\" for none)")
        swept = sweep_values(self.sweep)
        for seed in range(self.seeds):  # every run's config is checked before the first one trains
            for scenario in self.scenarios.split(","):
                for spec in self.methods.split(","):
                    method_config(self, spec, seed, Path(self.out), scenario)
                    for value in swept[1]:
                        method_config(self, spec, seed, Path(self.out), scenario, {swept[0]: value})


def sweep_values(text: str) -> tuple[str, list[str]]:
    """'lr=1e-5,3e-5' -> ('lr', ['1e-5', '3e-5']); '' -> ('', [])."""
    if not text.strip():
        return "", []
    key, sep, values = text.partition("=")
    values = [v.strip() for v in values.split(",") if v.strip()]
    if not sep or not key.strip() or not values:
        raise C.ConfigError(f"config key 'sweep': expected key=value1,value2,..., got {text!r}")
    return key.strip(), values


# What each scenario changes in every method's TrainConfig (README: "Scenarios"):
SCENARIOS = {
    "full": {},  # worked references in the student's own style
    "terse": {"reference": "terse"},  # references that skip intermediate results (embedded tasks)
    "answer": {"reference": "answer"},  # only the final answer: the impossible-knowledge case
    "hard": {"level": "hard"},  # one level above the post-training level: too hard for the student alone
    # the controls: how much of a gain is the privileged information (the reference itself)?
    "shuffled": {"shuffle_references": "true"},  # each problem shows the teacher another problem's reference
    "terse-shuffled": {"reference": "terse", "shuffle_references": "true"},
    "noref": {"hint": "blank"},  # the teacher's prompt with an empty reference
}


def method_config(cfg: CompareConfig, spec: str, seed: int, out: Path, scenario: str = "full",
                  chosen: dict | None = None) -> TrainConfig:
    # method[:rule[:rollout]][+key=value...], e.g. self-distill:none:guided or self-distill+gate=none
    name, *own = spec.split("+")
    method, rule, rollout = (name.split(":") + ["", ""])[:3]
    bad = next((item for item in own if "=" not in item), None)
    if bad is not None:
        raise C.ConfigError(f"config key 'methods': {bad!r} in {spec!r} is not key=value")
    steps = cfg.rollouts // cfg.samples_per_step
    kw = dict(model=cfg.model, out=str(out), task=cfg.task, data=cfg.data, eval_data=cfg.eval_data,
              fields=cfg.fields, verifier=cfg.verifier,
              method=method, seed=seed, rollouts=cfg.rollouts, checkpoint_every=0,
              eval_every=max(1, steps // cfg.eval_points), prompts_per_step=cfg.samples_per_step)
    from handrail.methods import METHODS

    kind = METHODS.get(method)
    if kind is not None and kind.grouped:
        kw.update(prompts_per_step=cfg.samples_per_step // cfg.group_size, samples_per_prompt=cfg.group_size)
    if kind is not None and kind.one_per_prompt:  # one rollout (or search) per prompt; branches fill the step
        kw.update(prompts_per_step=max(1, cfg.samples_per_step // cfg.group_size), samples_per_prompt=1)
    if rule:
        kw["rule"] = rule
    if rollout:
        kw["rollout"] = rollout
    kw.update(SCENARIOS[scenario])
    if kw.get("level") == "hard":
        from handrail.data.tasks import DEFAULT_TASK, get_task

        kw["level"] = get_task(cfg.task or DEFAULT_TASK).post_level + 1
    extra = [item for item in cfg.train.split(",") if item.strip()]
    bad = next((item for item in extra if "=" not in item), None)
    if bad is not None:
        raise C.ConfigError(f"config key 'train': {bad!r} is not key=value")
    extra, chosen = dict(item.split("=", 1) for item in extra), dict(chosen or {})
    if kind is not None:  # `train=` and a swept key apply to every method that reads them, not to the others
        theirs = kind.foreign()
        extra, chosen = ({k: v for k, v in d.items() if k.strip() not in theirs} for d in (extra, chosen))
    built = C.build(TrainConfig, overrides={**kw, **extra, **dict(item.split("=", 1) for item in own), **chosen})
    if built.rollouts_per_step != cfg.samples_per_step and "eval_every" not in (chosen or {}):
        # a method whose steps cost other than samples_per_step (vine's branches) is evaluated
        # as often in samples, not in steps; a search's cost is not known ahead: every step
        steps = built.rollouts // built.rollouts_per_step
        built.eval_every = 1 if METHODS[method].cost_varies else max(1, steps // cfg.eval_points)
    return built


def curve(run: Path, score: str = "strict") -> list[dict]:
    """A run's evaluations; "pass@1" is the `score` the comparison is judged by (strict or
    lenient: answers.py), "pass@1_other" the other one."""
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    keys = ("eval/pass@1", "eval/pass@1_lenient")[::1 if score == "strict" else -1]
    return [{"samples": r["samples"],  # what the run had spent (budget.py), bootstrap and SFT's examples included
             "seconds": r["seconds"],
             "pass@1": r[keys[0]], "pass@1_other": r.get(keys[1]), "leak_rate": r["eval/leak_rate"],
             "tokens_per_solved": r.get("eval/tokens_per_solved")} for r in rows if "eval/pass@1" in r]


def samples_to_reach(points: list[tuple[int, float]], target: float) -> int | None:
    return next((s for s, acc in points if acc >= target - 1e-9), None)


def mean_curve(curves: list[list[dict]], key: str = "pass@1") -> list[tuple[int, float, float]]:
    """(samples, mean, sd) over seeds at every sample count where some seed was evaluated, each
    seed counted at its latest evaluation at or before that count. Runs whose cost varies (expert
    iteration) are evaluated at different counts, and a run that has ended stays at its last
    value; runs evaluated at the same counts give exactly those points."""
    out = []
    for s in sorted({p["samples"] for c in curves for p in c}):
        vals = [next((p[key] for p in reversed(c) if p["samples"] <= s), None) for c in curves]
        if None not in vals:
            out.append((s, statistics.mean(vals), statistics.pstdev(vals)))
    return out


def compare(cfg: CompareConfig, log=print) -> dict:
    out = Path(cfg.out)
    if out.exists() and any(out.iterdir()):
        raise UsageError(f"{out}: already exists and is not empty; choose another --out")
    with FolderLock(out):  # one comparison per folder (each run also locks its own)
        return _compare(cfg, out, log)


def _compare(cfg: CompareConfig, out: Path, log) -> dict:
    from handrail.commands.sources import environment

    C.save(cfg, out / "compare_config.json")
    (out / "environment.json").write_text(json.dumps(environment(cfg.model), indent=2) + "\n")
    scenarios, specs = cfg.scenarios.split(","), cfg.methods.split(",")
    report = {"config": cfg.__dict__, "scenarios": {}}
    chosen = _sweep(cfg, out, scenarios, specs, report, log) if cfg.sweep else {}
    todo = {(scenario, spec, seed): out / (f"{scenario}/" if len(scenarios) > 1 else "") / f"{spec.replace(':', '-')}-s{seed}"
            for scenario in scenarios for spec in specs for seed in range(cfg.seeds)}
    summaries = _train_all(cfg, {key: method_config(cfg, key[1], key[2], run, key[0], chosen.get(key[:2]))
                                 for key, run in todo.items()}, log)
    failed = next((key for key, s in summaries.items() if "error" in s), None)
    if failed:
        raise UsageError(f"run {todo[failed]} failed ({summaries[failed]['error']}); the other runs are kept in {out}")
    for scenario in scenarios:
        results = {}
        for spec in cfg.methods.split(","):
            runs = [{"seed": seed, "curve": curve(todo[scenario, spec, seed], cfg.score),
                     "seconds": summaries[scenario, spec, seed]["seconds"],
                     "rollouts": summaries[scenario, spec, seed]["rollouts"]} for seed in range(cfg.seeds)]
            results[spec] = {"runs": runs, "mean": mean_curve([r["curve"] for r in runs])}
        report["scenarios"][scenario] = {"methods": results, "ratio": efficiency_ratio(results, cfg.ratio)}
    with writing(out / "results.json"):
        (out / "results.json").write_text(json.dumps(report, indent=2))
    text = "\n".join((f"### scenario: {name}\n\n" if len(scenarios) > 1 else "") + table(r["methods"], r["ratio"], cfg.score)
                     + _sweep_line(report.get("sweep", {}).get(name))
                     for name, r in report["scenarios"].items())
    with writing(out / "table.md"):
        (out / "table.md").write_text(text)
    with writing(out / "accuracy.png", partial=out / "accuracy.png"):
        plot(report["scenarios"], out / "accuracy.png", cfg.score)
    log(text)  # each table ends with its sample-efficiency ratio
    log(f"plot: {out / 'accuracy.png'}")
    return report


def _sweep(cfg: CompareConfig, out: Path, scenarios: list[str], specs: list[str], report: dict, log) -> dict:
    """Every (scenario, method) tries every swept value on the validation split (`sweep_seeds`
    seeds, evaluated at the end), and keeps the value with the best mean validation pass@1 (the
    first one listed on a tie). Returns {(scenario, spec): {key: value}} and records all of it."""
    key, values = sweep_values(cfg.sweep)

    def held(spec, scenario):
        """Validation problems, evaluated at the end only; a curriculum keeps its own checks."""
        own = method_config(cfg, spec, 0, out, scenario)
        return {"eval_split": "validation", "eval_data": cfg.val_data,
                **({} if own.curriculum != "none" else {"eval_every": 0})}

    runs = {(scenario, spec, value, seed): method_config(
                cfg, spec, 1000 + seed, out / "sweep" / scenario / f"{spec.replace(':', '-')}-{key}{value}-s{seed}",
                scenario, {key: value, **held(spec, scenario)})
            for scenario in scenarios for spec in specs for value in values for seed in range(cfg.sweep_seeds)}
    log(f"[compare] sweep: {len(runs)} validation runs ({key} in {', '.join(values)})")
    summaries = _train_all(cfg, runs, log)
    chosen, record = {}, {}
    for scenario in scenarios:
        for spec in specs:
            scores = {v: None if any("error" in summaries[scenario, spec, v, s] for s in range(cfg.sweep_seeds)) else
                      statistics.mean(curve(Path(runs[scenario, spec, v, s].out), cfg.score)[-1]["pass@1"]
                                      for s in range(cfg.sweep_seeds)) for v in values}
            if all(score is None for score in scores.values()):
                raise UsageError(f"sweep: every {key} failed for {spec} in scenario {scenario}: "
                                 f"{summaries[scenario, spec, values[0], 0]['error']}")
            best = max((v for v in values if scores[v] is not None), key=lambda v: scores[v])  # first of equals
            chosen[scenario, spec] = {key: best}
            record.setdefault(scenario, {})[spec] = {"key": key, "validation_pass@1": scores, "chosen": best}
    report["sweep"] = record
    return chosen


def _sweep_line(record: dict | None) -> str:
    if not record:
        return ""
    parts = [f"{spec} {r['key']}={r['chosen']} ({r['validation_pass@1'][r['chosen']]:.1%} of "
             + ", ".join("failed" if v is None else f"{v:.1%}" for v in r['validation_pass@1'].values()) + ")"
             for spec, r in record.items()]
    return "\nchosen on the validation split: " + "; ".join(parts) + "\n"


def _train_one(cfg: TrainConfig) -> dict:
    """A run's summary, or {"error": ...}: one failed run (a bootstrap that solved nothing, a
    learning rate that blew up) must not take the finished ones down with it."""
    try:
        return train(cfg, log=lambda *_: None)
    except (ValueError, RuntimeError) as e:
        return {"error": f"{type(e).__name__}: {first_line(e)}"}


def _quiet_worker() -> None:
    """A worker process starts without the CLI's settings; the parent's one bar counts runs, and a
    bar per worker would interleave with it."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    os.environ["HANDRAIL_NO_BAR"] = "1"


def _train_all(cfg: CompareConfig, configs: dict, log) -> dict:
    """Train every run ({key: TrainConfig}), `jobs` at a time in separate processes. Each run is
    pinned to one thread unless `train=threads=N` says otherwise, so its result does not depend on
    how many ran beside it."""
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from multiprocessing import get_context

    for c in configs.values():
        c.threads = c.threads or 1
    jobs = min(cfg.jobs or os.cpu_count() or 1, len(configs))
    bar = progress(len(configs), f"compare ({jobs} at a time)", "run")
    done = {}
    if jobs == 1:
        hidden = os.environ.get("HANDRAIL_NO_BAR")
        os.environ["HANDRAIL_NO_BAR"] = "1"  # one bar, the runs': a run's own bar under it would interleave
        try:
            for key, c in configs.items():
                done[key] = _train_one(c)
                bar.update(1)
                log(f"[compare] {' '.join(map(str, key))}: done")
        finally:
            if hidden is None:
                os.environ.pop("HANDRAIL_NO_BAR")
            else:
                os.environ["HANDRAIL_NO_BAR"] = hidden
    else:
        with ProcessPoolExecutor(jobs, mp_context=get_context("spawn"), initializer=_quiet_worker) as pool:
            futures = {pool.submit(_train_one, c): key for key, c in configs.items()}
            for f in as_completed(futures):
                key = futures[f]
                done[key] = f.result()
                bar.update(1)
                log(f"[compare] {' '.join(map(str, key))}: done")
    bar.close()
    return done


def efficiency_ratio(results: dict, pair: str = "self-distill/grpo") -> dict:
    """The sample-efficiency ratio of `pair`, "METHOD/BASELINE": rollouts the baseline needs to
    reach its best mean accuracy, over rollouts the method needs to reach the same (the first spec
    of each in `results`: `grpo+rollouts=4096` gives the baseline a budget of its own, so that its
    best is measured rather than cut off by the shared budget)."""
    if not pair:
        return {"ratio": None, "message": ""}
    of, to = pair.split("/")

    def first(method):
        return next((k for k in results if k.split("+")[0].split(":")[0] == method), None)

    spec, base = first(of), first(to)
    if base is None or spec is None:
        return {"ratio": None, "message": f"sample-efficiency ratio: needs {of} and {to} in --methods"}
    curve = results[base]["mean"]
    target = max(m for _, m, _ in curve)  # the baseline's best mean accuracy over the evaluation points
    n_base = samples_to_reach([(s, m) for s, m, _ in curve], target)
    n_spec = samples_to_reach([(s, m) for s, m, _ in results[spec]["mean"]], target)
    found = {"method": spec, "baseline": base, "target": target, "baseline_rollouts": n_base}
    if n_spec is None:
        msg = (f"sample-efficiency ratio: {spec} never reached {base}'s best accuracy {target:.1%} "
               f"within {curve[-1][0]} rollouts")
        return {"ratio": None, **found, "method_rollouts": None, "message": msg}
    if n_spec == 0:
        msg = (f"sample-efficiency ratio: undefined, the base model already scores {base}'s best "
               f"accuracy {target:.1%} ({base} did not improve on it)")
        return {"ratio": None, **found, "method_rollouts": 0, "message": msg}
    ratio = n_base / n_spec
    per_seed = _per_seed_ratios(results[base]["runs"], results[spec]["runs"])
    wall = _seconds_at(results[base]["runs"], n_base) / max(_seconds_at(results[spec]["runs"], n_spec), 1e-9)
    spread = ""
    if per_seed and all(r is not None for r in per_seed):
        spread = f"; per seed, to its own {base} best: {statistics.mean(per_seed):.2f} ± {statistics.pstdev(per_seed):.2f}"
    elif per_seed:
        spread = f"; per seed, to its own {base} best: {', '.join('n/a' if r is None else f'{r:.2f}' for r in per_seed)}"
    # where the curves' ends set the figure, it is a bound, not a measurement: the method already
    # there at its first evaluation (evaluate earlier: more eval_points), or the baseline's best at
    # its last one (it may still be rising: give it a budget of its own, grpo+rollouts=N)
    floor = n_spec == min(s for s, _, _ in results[spec]["mean"] if s > 0)
    rising = n_base == curve[-1][0]
    caveats = ([f"at least: {spec} reached it at its first evaluation"] if floor else []) + \
              ([f"{base}'s best is at its last evaluation, so its target may be low"] if rising else [])
    msg = (f"sample-efficiency ratio: {ratio:.2f} ({base} reaches its best {target:.1%} at {n_base} rollouts, "
           f"{spec} at {n_spec}; mean curves over seeds{spread}); wall-clock ratio to the same target {wall:.2f}"
           + "".join(f"; {c}" for c in caveats))
    return {"ratio": ratio, **found, "method_rollouts": n_spec, "per_seed": per_seed, "wall_clock_ratio": wall,
            "lower_bound": floor, "baseline_still_rising": rising, "message": msg}


def _per_seed_ratios(base_runs: list, runs: list) -> list[float | None]:
    """Seed i of the baseline against seed i of the method, to the baseline seed i's own best
    accuracy: None where the method never reaches it (or starts there)."""
    out = []
    for b, r in zip(base_runs, runs):
        target = max(p["pass@1"] for p in b["curve"])
        n_base = samples_to_reach([(p["samples"], p["pass@1"]) for p in b["curve"]], target)
        n_spec = samples_to_reach([(p["samples"], p["pass@1"]) for p in r["curve"]], target)
        out.append(n_base / n_spec if n_base and n_spec else None)
    return out


def _seconds_at(runs: list, samples: int) -> float:
    """Mean wall-clock seconds the runs had spent when they had drawn `samples` samples."""
    return statistics.mean(next(p["seconds"] for p in r["curve"] if p["samples"] >= samples) for r in runs)


def table(results: dict, ratio: dict, score: str = "strict") -> str:
    other = "lenient" if score == "strict" else "strict"
    lines = [f"| method | pass@1 start | pass@1 end (mean ± sd) | best | {other} end | leak end | tokens/solved start → end | seconds/run |",
             "|---|---|---|---|---|---|---|---|"]

    def tokens(runs, at):
        vals = [run["curve"][at].get("tokens_per_solved") for run in runs]
        vals = [v for v in vals if v is not None]
        return f"{statistics.mean(vals):.1f}" if vals else "n/a"

    for spec, r in results.items():
        ends = [run["curve"][-1]["pass@1"] for run in r["runs"]]
        best = max(m for _, m, _ in r["mean"])
        leak = statistics.mean(run["curve"][-1]["leak_rate"] for run in r["runs"])
        secs = statistics.mean(run["seconds"] for run in r["runs"])
        others = [run["curve"][-1].get("pass@1_other") for run in r["runs"]]
        other_end = "n/a" if None in others else f"{statistics.mean(others):.1%}"
        lines.append(f"| {spec} | {r['mean'][0][1]:.1%} | {statistics.mean(ends):.1%} ± "
                     f"{statistics.pstdev(ends):.1%} | {best:.1%} | {other_end} | {leak:.1%} | "
                     f"{tokens(r['runs'], 0)} → {tokens(r['runs'], -1)} | {secs:.0f} |")
    return "\n".join(lines) + (f"\n\n{ratio['message']}\n" if ratio["message"] else "\n")


def plot(scenarios: dict, path: Path, score: str = "strict") -> None:
    """One column per scenario: held-out pass@1 (top) and leak rate (bottom) against samples."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(scenarios)
    fig, axes = plt.subplots(2, n, figsize=(4.2 * n + 1, 7), squeeze=False, sharex="col")
    for col, (name, sc) in enumerate(scenarios.items()):
        for spec, r in sc["methods"].items():
            for row, key in enumerate(("pass@1", "leak_rate")):
                stats = mean_curve([run["curve"] for run in r["runs"]], key)
                xs, m, sd = ([p[i] for p in stats] for i in range(3))
                line, = axes[row][col].plot(xs, m, marker="o", markersize=3, label=spec)
                axes[row][col].fill_between(xs, [x - y for x, y in zip(m, sd)], [x + y for x, y in zip(m, sd)],
                                            color=line.get_color(), alpha=0.15)
        axes[0][col].set_title(f"scenario: {name}" if n > 1 else "")
        axes[1][col].set_xlabel("samples (rollouts; reference examples for sft)")
        for row, label in enumerate((f"held-out pass@1 (greedy, {score})", "leak rate (answer before the work)")):
            axes[row][col].set_ylabel(label)
            axes[row][col].grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    runs = next(iter(next(iter(scenarios.values()))["methods"].values()))["runs"]
    fig.suptitle(f"mean ± sd over {len(runs)} seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
