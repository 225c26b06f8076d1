"""Self-distillation on a pretrained instruct model: does a setting teach the student to state the
answer before any work? (BENCHMARKS.md §P)

    python benchmarks/word_problems.py --out /tmp/wp1 --steps 1
    python benchmarks/pretrained.py --data /tmp/wp1 --out /tmp/pre --settings default,cf --seeds 0,1,2 --jobs 2
    python benchmarks/pretrained.py --data /tmp/wp1 --out /tmp/pre --runs default:1,cf:2 --jobs 2

Each (setting, seed) is one `handrail train` on `train.jsonl` (LoRA, the defaults otherwise: rule,
gate, learning rate) followed by one greedy `handrail eval` on the first `--n` records of
`test.jsonl`; the base model is evaluated once the same way. Settings are named sets of train
keys (`SETTINGS`). Runs go one per process (`--threads` each), `--jobs` at a time; a finished run is
reused, so an interrupted benchmark continues. Prints a table of strict and lenient pass@1 and
the leak rate (the final answer written before any work: handrail/data/answers.py) and writes
`results.json` beside the runs.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

SETTINGS = {
    "default": [],  # counterfactual=auto: on when the teacher states answers first (train.resolve_counterfactual)
    "cf": ["counterfactual=shuffled"],
    "off": ["counterfactual=none"],  # the default before auto
}
TRAIN = ["--rollouts", "128", "lora_r=16", "max_new_tokens=64", "eval_n=0", "checkpoint_every=0"]
THREADS = "1"  # per process (--threads)


def cli(*args: str, log: Path, stdout: Path | None = None) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": THREADS, "HANDRAIL_NO_BAR": "1"}
    with open(log, "a") as f, open(stdout or log, "a") as o:
        p = subprocess.run([sys.executable, "-m", "handrail.cli", *args], stdout=o, stderr=f, env=env)
    if p.returncode:
        raise SystemExit(f"failed ({p.returncode}): handrail {' '.join(args)}; see {log}")


def evaluate(model: str, data: Path, n: int, folder: Path) -> dict:
    res = folder / "eval.json"
    if not res.exists():
        folder.mkdir(parents=True, exist_ok=True)
        out = folder / "eval.out"
        out.unlink(missing_ok=True)
        cli("eval", "--model", model, "--data", str(data / "test.jsonl"), "--n", str(n), "--max-new-tokens", "64",
            "--completions", str(folder / "completions.jsonl"), "--json", log=folder / "eval.log", stdout=out)
        out.rename(res)  # --json prints one object; renamed only once whole
    return json.loads(res.read_text())


def run(setting: str, seed: int, a) -> dict:
    folder = Path(a.out) / f"{setting}-s{seed}"
    if not (folder / "run" / "model").exists():
        folder.mkdir(parents=True, exist_ok=True)
        cli("train", "--model", a.model, "--data", str(Path(a.data) / "train.jsonl"), "--out", str(folder / "run"),
            "--seed", str(seed), *TRAIN, f"threads={THREADS}", *SETTINGS[setting], log=folder / "train.log")
    return evaluate(str(folder / "run" / "model"), Path(a.data), a.n, folder)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True, help="folder from benchmarks/word_problems.py")
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--settings", default="default,cf")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--runs", help="instead of settings x seeds: setting:seed,... (e.g. default:1,cf:2)")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    a = ap.parse_args()
    global THREADS
    THREADS = str(a.threads)
    if a.runs:
        jobs = [(r.split(":")[0], int(r.split(":")[1])) for r in a.runs.split(",")]
    else:
        jobs = [(s, int(seed)) for s in a.settings.split(",") for seed in a.seeds.split(",")]
    for s, _ in jobs:
        if s not in SETTINGS:
            raise SystemExit(f"unknown setting {s!r} (known: {', '.join(SETTINGS)})")
    settings = list(dict.fromkeys(s for s, _ in jobs))
    with ThreadPoolExecutor(a.jobs) as pool:
        base = pool.submit(evaluate, a.model, Path(a.data), a.n, Path(a.out) / "base")
        done = dict(zip(jobs, pool.map(lambda j: run(*j, a), jobs)))
        base = base.result()
    keys = ("accuracy", "accuracy_lenient", "leak_rate")
    table = {"base": {k: base[k] for k in keys}}
    print("| setting | seed | strict | lenient | leak |\n|---|---|---|---|---|")
    print(f"| base | - | {base['accuracy']:.1%} | {base['accuracy_lenient']:.1%} | {base['leak_rate']:.1%} |")
    for s in settings:
        seeds = [seed for t, seed in jobs if t == s]
        per = [done[(s, seed)] for seed in seeds]
        for seed, r in zip(seeds, per):
            print(f"| {s} | {seed} | {r['accuracy']:.1%} | {r['accuracy_lenient']:.1%} | {r['leak_rate']:.1%} |")
        table[s] = {"seeds": seeds, **{k: [r[k] for r in per] for k in keys},
                    **{f"{k}_mean": statistics.mean(r[k] for r in per) for k in keys}}
        print(f"| {s} | mean | {table[s]['accuracy_mean']:.1%} | {table[s]['accuracy_lenient_mean']:.1%} | "
              f"{table[s]['leak_rate_mean']:.1%} |")
    (Path(a.out) / "results.json").write_text(json.dumps(table, indent=1) + "\n")
    print(f"results: {Path(a.out) / 'results.json'}")


if __name__ == "__main__":
    main()
