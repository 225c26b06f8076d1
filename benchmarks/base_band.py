"""Does `handrail pretrain`'s default recipe land in the lab's band on every CPU and seed?

    python benchmarks/base_band.py --seeds 1,2,3 --isas native,avx2,default --out benchmarks/results/base_band.json

Builds the default recipe (plus any `key=value` overrides) once per seed and emulated instruction
set, each in its own process (the instruction set is chosen when torch loads), and prints, per
build: the unaided student's and the full-reference teacher's held-out greedy pass@1 at the
post-training level, the same at the too-hard level (post level + 1), the teacher probe's
consistent share (benchmarks/teacher_probe.py), and the build time. `native` leaves the CPU's
own instruction set; `avx2` and `default` emulate older CPUs on this one.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ISA_ENV = {
    "native": {},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "default": {"ATEN_CPU_CAPABILITY": "default", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
}

CHILD = r"""
import json, sys, torch
sys.path.insert(0, {bench!r})
from handrail.runtime.evaluate import evaluate
from handrail.runtime.models import load_model
from handrail.commands.sources import eval_records
from teacher_probe import probe
out = {out!r}
res = json.load(open(out + "/pretrain_result.json"))
model, tok, tpl = load_model(out)
task, hard = eval_records(None, None, level=None, n=200)
task, hard = eval_records(task.name, None, level=task.post_level + 1, n=200)
res["hard_student"] = evaluate(model, tok, tpl, hard, task=task, samples=0)["accuracy"]
res["hard_teacher"] = evaluate(model, tok, tpl, hard, task=task, hint="solution", samples=0)["accuracy"]
res["probe_consistent"] = probe(out)["consistent"]
res["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
print("RESULT " + json.dumps(res))
"""


def build(seed: int, isa: str, overrides: list[str], folder: Path) -> dict:
    env = {**os.environ, **ISA_ENV[isa], "HF_HUB_OFFLINE": "1"}
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "handrail.cli", "pretrain", "--out", str(folder), "--seed", str(seed),
                    *overrides], check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.time() - t0
    code = CHILD.format(bench=str(Path(__file__).parent), out=str(folder))
    p = subprocess.run([sys.executable, "-c", code], check=True, env=env, capture_output=True, text=True)
    res = json.loads(next(line for line in p.stdout.splitlines() if line.startswith("RESULT "))[7:])
    return {"seed": seed, "isa": isa, "wall_seconds": round(wall, 1), **res}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--isas", default="native,avx2,default")
    ap.add_argument("--out", required=True)
    ap.add_argument("--keep", help="folder to keep the built models in (default: a temporary one)")
    ap.add_argument("overrides", nargs="*", help="key=value PretrainConfig overrides")
    a = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for isa in a.isas.split(","):
            for seed in map(int, a.seeds.split(",")):
                rows.append(build(seed, isa, a.overrides, Path(a.keep or tmp) / f"{isa}-{seed}"))
                print(json.dumps({k: rows[-1][k] for k in ("seed", "isa", "cpu_capability", "student_accuracy",
                                                           "teacher_accuracy", "hard_student", "hard_teacher",
                                                           "probe_consistent", "wall_seconds")}), flush=True)
                # written after every build, so a long matrix cut short keeps what it measured
                Path(a.out).parent.mkdir(parents=True, exist_ok=True)
                Path(a.out).write_text(json.dumps({"overrides": a.overrides, "builds": rows}, indent=2) + "\n")
    print("\n| ISA (torch reports) | seed | student | teacher | too-hard student | too-hard teacher | probe consistent | in band | build wall s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['isa']} ({r['cpu_capability']}) | {r['seed']} | {r['student_accuracy']:.1%} | "
              f"{r['teacher_accuracy']:.1%} | {r['hard_student']:.1%} | {r['hard_teacher']:.1%} | "
              f"{r['probe_consistent']:.1%} | {'yes' if r['band']['ok'] else 'NO'} | {r['wall_seconds']:.0f} |")
    s = [r["student_accuracy"] for r in rows]
    t = [r["teacher_accuracy"] for r in rows]
    print(f"\nstudent {min(s):.1%}..{max(s):.1%}, teacher {min(t):.1%}..{max(t):.1%} over {len(rows)} builds; "
          f"in band: {sum(r['band']['ok'] for r in rows)}/{len(rows)}")


if __name__ == "__main__":
    main()
