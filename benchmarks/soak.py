"""A soak: one training run killed again and again (SIGTERM or SIGKILL at random moments) and
resumed each time, against the same run left alone: are the final weights the same, and does
metrics.jsonl hold every step once? (BENCHMARKS.md §R2)

    python benchmarks/soak.py --interruptions 20 --out benchmarks/results/soak.json

Both runs: `handrail train --model default` (the lab's base, cached) on the embedded task,
self-distillation with the defaults, `checkpoint_every=1`, one thread. The interrupted run is
started, then killed after a random wait drawn to land anywhere from start-up to a few steps in
(so kills fall while loading, sampling, stepping and writing a checkpoint), then resumed with
`--resume`, until it has been interrupted `--interruptions` times after making progress; then it
is resumed once more to finish. Weights are compared tensor by tensor (bitwise, and the largest
difference).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TRAIN = ["--model", "default", "--rollouts", "4800", "max_new_tokens=32", "eval_n=0", "train_n=256",
         "checkpoint_every=1", "threads=1"]


def cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "handrail.cli", "train", *args]


def steps_done(out: Path) -> int:
    try:
        return json.loads((out / "checkpoint" / "state.json").read_text())["step"]
    except (OSError, ValueError, KeyError):
        return 0


def weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--interruptions", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0, help="of the kill schedule (the run's own seed is 0)")
    ap.add_argument("--max-wait", type=float, default=22.0, help="seconds: kills land uniformly in [2, this]")
    ap.add_argument("--out", help="a JSON file for the figures")
    a = ap.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HANDRAIL_NO_BAR": "1", "OMP_NUM_THREADS": "1"}
    rng = random.Random(a.seed)
    with tempfile.TemporaryDirectory() as tmp:
        clean, soaked = Path(tmp) / "clean", Path(tmp) / "soaked"
        t0 = time.time()
        subprocess.run(cmd("--out", str(clean), *TRAIN), env=env, check=True, capture_output=True)
        clean_s = time.time() - t0
        log, kills, starts, t0 = [], 0, 0, time.time()
        while True:
            before = steps_done(soaked)
            args = cmd("--resume", str(soaked)) if (soaked / "config.json").exists() else cmd("--out", str(soaked), *TRAIN)
            p = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            starts += 1
            wait = rng.uniform(2.0, a.max_wait)
            sig = rng.choice([signal.SIGTERM, signal.SIGKILL])
            try:
                rc = p.wait(timeout=None if kills >= a.interruptions else wait)
            except subprocess.TimeoutExpired:
                p.send_signal(sig)
                rc = p.wait()
            err = p.stderr.read()
            after = steps_done(soaked)
            log.append({"start": starts, "signal": None if rc == 0 else sig.name, "wait_s": round(wait, 2),
                        "rc": rc, "step_before": before, "step_after": after})
            print(f"start {starts:>3}: {'finished' if rc == 0 else sig.name:<8} after {wait:5.1f} s, rc {rc:>4}, "
                  f"checkpoint step {before} -> {after}", flush=True)
            if rc == 0:
                break
            if rc not in (-9, 143, -15):
                raise SystemExit(f"an unexpected exit {rc}:\n{err[-3000:]}")
            if "Traceback" in err:
                raise SystemExit(f"a traceback after {sig.name}:\n{err[-3000:]}")
            kills += after > 0  # counted once the run had a checkpoint to lose
        soak_s = time.time() - t0
        a_w, b_w = weights(clean / "model"), weights(soaked / "model")
        assert a_w.keys() == b_w.keys()
        same = all((a_w[k] == b_w[k]).all() for k in a_w)
        diff = max(float((a_w[k].float() - b_w[k].float()).abs().max()) for k in a_w)
        steps = [json.loads(line)["step"] for line in (soaked / "metrics.jsonl").read_text().splitlines()]
        clean_steps = [json.loads(line)["step"] for line in (clean / "metrics.jsonl").read_text().splitlines()]
        result = {"interruptions": sum(r["signal"] is not None for r in log), "counted": kills,
                  "sigkill": sum(r["signal"] == "SIGKILL" for r in log),
                  "sigterm": sum(r["signal"] == "SIGTERM" for r in log),
                  "bitwise_equal": same, "max_abs_diff": diff, "metrics_steps_once": steps == clean_steps,
                  "steps": clean_steps[-1], "clean_s": round(clean_s, 1), "soak_s": round(soak_s, 1), "log": log}
    print(f"{result['interruptions']} interruptions ({result['sigterm']} SIGTERM, {result['sigkill']} SIGKILL), "
          f"{result['steps']} steps: weights bitwise equal: {same} (largest difference {diff:.3g}); "
          f"metrics.jsonl every step once: {result['metrics_steps_once']}")
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
