"""benchmarks/gpu_check.py in its CPU form: every check passes on small shapes, the figures are
taken, and it needs nothing a bare GPU image lacks (datasets, pyarrow, matplotlib, gguf)."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

BLOCK = """
import runpy, sys
for name in ("datasets", "pyarrow", "matplotlib", "gguf", "math_verify", "trl"):  # transformers brings yaml, numpy
    sys.modules[name] = None  # import fails, as on an image without them
sys.argv = [%r, *sys.argv[1:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_the_gpu_check_runs_on_the_cpu_with_small_shapes_and_no_optional_packages(tmp_path):
    script = str(ROOT / "benchmarks" / "gpu_check.py")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2", "HANDRAIL_CACHE": str(tmp_path / "cache")}
    p = subprocess.run([sys.executable, "-c", BLOCK % script, "--small", "--out", str(tmp_path),
                        "--models", "qwen2.5-0.5b"], capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    names = [c["check"] for c in result["checks"]]
    from handrail.methods import METHODS

    assert {"decoder qwen2.5-0.5b fp32", "decoder qwen2.5-0.5b bf16", "decoder llama fp32", "decoder llama bf16",
            "fused loss full teacher", "fused loss top-16 teacher", "lora adapter-off teacher"} <= set(names)
    assert {f"methods bf16: {m}" for m in METHODS} <= set(names)
    assert all(c["ok"] for c in result["checks"])
    figures = {f["figure"]: f for f in result["figures"]}
    assert all(f["value"] is not None and f["value"] > 0 for f in figures.values()), figures
    assert {"rollout qwen2.5-0.5b lean decoder", "step qwen2.5-0.5b self-distill lora r=16",
            "step qwen2.5-0.5b grpo full", "loss T=64 fused"} <= set(figures)
