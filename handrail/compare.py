"""`handrail compare`: every method from the same base model, at the same budget, evaluated on
the same held-out problems at the same points, over several seeds.

Budgets are in samples: a rollout (one sampled student completion) for on-policy methods, one
reference solution for SFT, so every method consumes `rollouts_per_step` per step and the
evaluation points line up. Writes `results.json`, `accuracy.png` (held-out pass@1 against
samples and against wall-clock, mean ± spread over seeds) and `table.md`, and prints the
sample-efficiency ratio: rollouts GRPO needs to reach its final accuracy ÷ rollouts
self-distillation needs to reach the same.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path

from handrail import config as C
from handrail.train import TrainConfig, train


@dataclass
class CompareConfig:
    model: str = ""  # base model every method starts from
    out: str = "runs/compare"
    task: str | None = None
    data: str | None = None
    eval_data: str | None = None
    methods: str = "self-distill,grpo,sft"  # comma-separated method[:rule[:rollout]], e.g. self-distill::guided
    rollouts: int = 1024  # samples per run (rollouts, or reference examples for sft)
    seeds: int = 3
    samples_per_step: int = 16  # global samples per step, for every method
    group_size: int = 4  # GRPO's G: prompts per step = samples_per_step / G
    eval_points: int = 8  # evaluations per run, at the same sample counts for every method
    train: str = ""  # extra TrainConfig overrides for every run, "key=value,key=value"

    def validate(self):
        if not self.model:
            raise ValueError("config key 'model': required")
        if self.samples_per_step % self.group_size:
            raise ValueError("samples_per_step must be a multiple of group_size")


def method_config(cfg: CompareConfig, spec: str, seed: int, out: Path) -> TrainConfig:
    method, rule, rollout = (spec.split(":") + ["", ""])[:3]  # e.g. self-distill:none:guided
    steps = cfg.rollouts // cfg.samples_per_step
    kw = dict(model=cfg.model, out=str(out), task=cfg.task, data=cfg.data, eval_data=cfg.eval_data,
              method=method, seed=seed, rollouts=cfg.rollouts, checkpoint_every=0,
              eval_every=max(1, steps // cfg.eval_points), prompts_per_step=cfg.samples_per_step)
    if method == "grpo":
        kw.update(prompts_per_step=cfg.samples_per_step // cfg.group_size, samples_per_prompt=cfg.group_size)
    if rule:
        kw["rule"] = rule
    if rollout:
        kw["rollout"] = rollout
    extra = dict(item.split("=", 1) for item in cfg.train.split(",") if item.strip())
    return C.build(TrainConfig, overrides={**kw, **extra})


def curve(run: Path, per_step: int) -> list[dict]:
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    # a bootstrap stage's samples (train.py) come before step 1 and count like any others
    return [{"samples": r["step"] * per_step + r.get("bootstrap_rollouts", 0), "seconds": r["seconds"],
             "pass@1": r["eval/pass@1"], "leak_rate": r["eval/leak_rate"]} for r in rows if "eval/pass@1" in r]


def samples_to_reach(points: list[tuple[int, float]], target: float) -> int | None:
    return next((s for s, acc in points if acc >= target - 1e-9), None)


def mean_curve(curves: list[list[dict]], key: str = "pass@1") -> list[tuple[int, float, float]]:
    out = []
    for i in range(min(len(c) for c in curves)):
        vals = [c[i][key] for c in curves]
        out.append((curves[0][i]["samples"], statistics.mean(vals), statistics.pstdev(vals)))
    return out


def compare(cfg: CompareConfig, log=print) -> dict:
    out = Path(cfg.out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out}: already exists and is not empty; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    C.save(cfg, out / "compare_config.json")
    results = {}
    for spec in cfg.methods.split(","):
        runs = []
        for seed in range(cfg.seeds):
            run = out / f"{spec.replace(':', '-')}-s{seed}"
            log(f"[compare] {spec} seed {seed}")
            summary = train(method_config(cfg, spec, seed, run), log=lambda *_: None)
            runs.append({"seed": seed, "curve": curve(run, cfg.samples_per_step), "seconds": summary["seconds"],
                         "rollouts": summary["rollouts"]})
        results[spec] = {"runs": runs, "mean": mean_curve([r["curve"] for r in runs])}
    report = {"config": cfg.__dict__, "methods": results, "ratio": efficiency_ratio(results)}
    (out / "results.json").write_text(json.dumps(report, indent=2))
    (out / "table.md").write_text(table(results, report["ratio"]))
    plot(results, out / "accuracy.png")
    log((out / "table.md").read_text())  # the table ends with the sample-efficiency ratio
    log(f"plot: {out / 'accuracy.png'}")
    return report


def efficiency_ratio(results: dict) -> dict:
    sd = next((k for k in results if k.startswith("self-distill")), None)
    if "grpo" not in results or sd is None:
        return {"ratio": None, "message": "sample-efficiency ratio: needs grpo and self-distill in --methods"}
    g = results["grpo"]["mean"]
    target = g[-1][1]
    n_g = samples_to_reach([(s, m) for s, m, _ in g], target)
    n_sd = samples_to_reach([(s, m) for s, m, _ in results[sd]["mean"]], target)
    if n_sd is None:
        msg = (f"sample-efficiency ratio: {sd} never reached GRPO's final accuracy {target:.1%} "
               f"within {g[-1][0]} rollouts")
        return {"ratio": None, "target": target, "grpo_rollouts": n_g, "sd_rollouts": None, "message": msg}
    if n_sd == 0:
        msg = (f"sample-efficiency ratio: undefined, the base model already scores GRPO's final "
               f"accuracy {target:.1%} (GRPO did not improve on it)")
        return {"ratio": None, "target": target, "grpo_rollouts": n_g, "sd_rollouts": 0, "message": msg}
    ratio = n_g / n_sd
    msg = (f"sample-efficiency ratio: {ratio:.2f} (GRPO reaches its final {target:.1%} at {n_g} rollouts, "
           f"{sd} at {n_sd})")
    return {"ratio": ratio, "target": target, "grpo_rollouts": n_g, "sd_rollouts": n_sd, "message": msg}


def table(results: dict, ratio: dict) -> str:
    lines = ["| method | pass@1 start | pass@1 end (mean ± sd) | best | leak end | seconds/run |",
             "|---|---|---|---|---|---|"]
    for spec, r in results.items():
        ends = [run["curve"][-1]["pass@1"] for run in r["runs"]]
        best = max(m for _, m, _ in r["mean"])
        leak = statistics.mean(run["curve"][-1]["leak_rate"] for run in r["runs"])
        secs = statistics.mean(run["seconds"] for run in r["runs"])
        lines.append(f"| {spec} | {r['mean'][0][1]:.1%} | {statistics.mean(ends):.1%} ± "
                     f"{statistics.pstdev(ends):.1%} | {best:.1%} | {leak:.1%} | {secs:.0f} |")
    return "\n".join(lines) + f"\n\n{ratio['message']}\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for spec, r in results.items():
        xs = [s for s, _, _ in r["mean"]]
        m = [v for _, v, _ in r["mean"]]
        sd = [v for _, _, v in r["mean"]]
        line, = a.plot(xs, m, marker="o", label=spec)
        a.fill_between(xs, [x - y for x, y in zip(m, sd)], [x + y for x, y in zip(m, sd)],
                       color=line.get_color(), alpha=0.15)
        secs = [statistics.mean(run["curve"][i]["seconds"] for run in r["runs"]) for i in range(len(xs))]
        b.plot(secs, m, marker="o", label=spec, color=line.get_color())
    a.set_xlabel("samples (rollouts; reference examples for sft)")
    b.set_xlabel("training wall-clock (s, mean over seeds)")
    for ax in (a, b):
        ax.set_ylabel("held-out pass@1 (greedy)")
        ax.grid(alpha=0.3)
    a.legend()
    fig.suptitle(f"mean ± sd over {len(next(iter(results.values()))['runs'])} seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
