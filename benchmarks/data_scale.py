"""A user's large dataset: time to the first training step and peak memory against the number of
records (BENCHMARKS.md §R1).

    python benchmarks/data_scale.py --sizes 10000,100000,1000000 --out benchmarks/results/data_scale.json
    python benchmarks/data_scale.py --sizes 100000 --repo /tmp/before   # another checkout, same figures

Records are the lab's own JSONL (the `chain` task at level 4: prompt, solution, answer), written
once to `--data-dir` (the smaller files are prefixes of the largest). Two measurements per size,
each in a fresh process, one after the other:

- `lab`: `handrail train --model default --data FILE` for one step (16 rollouts, 32 new tokens, no
  evaluation or checkpoint): the process's wall time, from start to exit with the model saved, so
  an upper bound on the time to the end of the first step; and the process's peak resident memory.
  Each size is run twice: the first builds the file's index (a pass over every record), the second
  finds it cached.
- `smollm2-tokenizer`: SmolLM2-135M-Instruct's tokenizer and chat template (the cached folder
  `handrail` converts once) on the same file: records read and checked to fit, and the first
  batch's student and teacher prompts tokenised; wall time and peak memory of the process.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def write_data(folder: Path, n: int) -> Path:
    path = folder / f"chain-{n}.jsonl"
    if path.exists():
        return path
    biggest = max((p for p in folder.glob("chain-*.jsonl") if int(p.stem.split("-")[1]) >= n),
                  key=lambda p: int(p.stem.split("-")[1]), default=None)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        if biggest is not None:  # a prefix of a larger file
            with open(biggest) as src:
                for _, line in zip(range(n), src):
                    f.write(line)
        else:
            from handrail.data.tasks import get_task

            task, made = get_task("chain"), 0
            while made < n:  # split() draws distinct problems; a million in pieces keeps memory flat
                k = min(100_000, n - made)
                for p in task.split("train", k, 4, seed=made):
                    f.write(json.dumps({"prompt": p.prompt, "solution": p.solution, "answer": p.answer}) + "\n")
                made += k
    tmp.rename(path)
    return path


def child_lab(data: str, out: str) -> dict:
    from handrail.cli import main

    rc = main(["train", "--model", "default", "--data", data, "--out", out, "--rollouts", "16",
               "max_new_tokens=32", "eval_n=0", "checkpoint_every=0", "threads=2"])
    rows = (Path(out) / "metrics.jsonl").read_text().splitlines()
    return {"rc": rc, "steps": len(rows), "step_seconds": json.loads(rows[-1])["time/step_s"] if rows else None}


def child_tokenizer(data: str) -> dict:
    from transformers import AutoTokenizer

    from handrail.data.records import Templates
    try:
        from handrail.data.datafile import load_records
        from handrail.runtime.evaluate import PromptIds, fit_records
        from handrail.runtime.models import smollm2_folder
    except ImportError:  # a checkout from before the sub-packages (and, older, before datafile.py)
        try:
            from handrail.datafile import load_records
        except ImportError:
            from handrail.data import load_records
        from handrail.evaluate import PromptIds, fit_records
        from handrail.models import smollm2_folder

    tok = AutoTokenizer.from_pretrained(smollm2_folder())
    t0 = time.time()
    templates, ids = Templates(), PromptIds(tok, Templates())
    records = fit_records(tok, load_records(data), templates, 8192 - 256, "error", ("none", "solution"), ids)
    import random

    batch = random.Random(0).sample(records, 16)
    n_tokens = sum(map(len, ids(batch))) + sum(map(len, ids(batch, "solution")))
    return {"records": len(records), "data_seconds": round(time.time() - t0, 2), "batch_tokens": n_tokens}


def measure(kind: str, data: Path, repo: Path, cache: Path) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "PYTHONPATH": str(repo), "HF_HUB_OFFLINE": "1", "HANDRAIL_NO_BAR": "1",
               "HANDRAIL_CACHE": str(cache), "OMP_NUM_THREADS": "2"}
        t0 = time.time()
        p = subprocess.run([sys.executable, __file__, "--child", kind, str(data), str(Path(tmp) / "run")],
                           env=env, capture_output=True, text=True, cwd=tmp)
        wall = time.time() - t0
    if p.returncode:
        raise SystemExit(f"{kind} on {data} failed:\n{p.stderr[-2000:]}")
    result = json.loads(p.stdout.strip().splitlines()[-1])
    return {**result, "wall_s": round(wall, 1)}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        kind, data, out = sys.argv[2:5]
        r = child_lab(data, out) if kind == "lab" else child_tokenizer(data)
        r["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        print(json.dumps(r))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--data-dir", default="/tmp/data_scale")
    ap.add_argument("--repo", default=str(ROOT), help="the checkout whose handrail is measured")
    ap.add_argument("--kinds", default="lab,smollm2-tokenizer")
    ap.add_argument("--out", help="a JSON file for the figures")
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from handrail.folders import cache_dir

    sizes = sorted(int(s) for s in a.sizes.split(","))
    for n in sorted(sizes, reverse=True):
        write_data(Path(a.data_dir), n)
    rows = []
    print(f"{'records':>9} {'kind':<18} {'pass':<7} {'wall s':>7} {'peak MB':>8}", flush=True)
    with tempfile.TemporaryDirectory() as index_cache:
        cache = Path(index_cache)  # the built base models are reused; each size's index starts uncached
        for name in ("base-chain", "smollm2"):
            for src in cache_dir().glob(f"{name}*"):
                (cache / src.name).symlink_to(src)
        for n in sizes:
            data = Path(a.data_dir) / f"chain-{n}.jsonl"
            for kind in a.kinds.split(","):
                for attempt in ("first", "cached") if kind == "lab" else ("cached",):
                    r = {"records": n, "kind": kind, "pass": attempt, **measure(kind, data, Path(a.repo), cache)}
                    rows.append(r)
                    print(f"{n:>9} {kind:<18} {attempt:<7} {r['wall_s']:>7} {r['peak_rss_mb']:>8}", flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps({"repo": a.repo, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
