"""benchmarks/word_problems.py, the pretrained-model lab's data: files disjoint, every solution's
arithmetic and answer right, the warm start's share of multi-step problems as asked, and the
held-out files unchanged by how the warm start is drawn (so §P2 and §P3 test on the same problems)."""

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make(out: Path, *args: str) -> dict[str, list[dict]]:
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "word_problems.py"), "--out", str(out),
                    "--train", "300", "--warmup", "400", *args], check=True, capture_output=True)
    return {n: [json.loads(line) for line in open(out / f"{n}.jsonl")] for n in ("train", "val", "test", "warmup")}


def steps(rec: dict) -> int:
    return len(re.findall(r" = ", rec["solution"]))


def test_files_are_disjoint_worked_right_and_the_warmup_share_is_as_asked(tmp_path):
    plain = make(tmp_path / "a", "--steps", "2")
    mixed = make(tmp_path / "b", "--steps", "2", "--warmup-steps", "1,1,1,2")
    for name in ("train", "val", "test"):
        assert plain[name] == mixed[name]
    prompts = [r["prompt"] for recs in mixed.values() for r in recs]
    assert len(prompts) == len(set(prompts))
    for rec in (r for recs in mixed.values() for r in recs):
        for a, op, b, c in re.findall(r"(\d+) ([+-]) (\d+) = (\d+)\.", rec["solution"]):
            assert int(c) == (int(a) + int(b) if op == "+" else int(a) - int(b))
        assert rec["solution"].endswith(f"#### {rec['answer']}")
        assert rec["solution"].splitlines()[-2].endswith(f"= {rec['answer']}.")
    assert all(steps(r) == 2 for r in mixed["test"] + mixed["train"])
    assert all(steps(r) == 1 for r in plain["warmup"])
    two = sum(steps(r) == 2 for r in mixed["warmup"])
    assert 60 <= two <= 140 and two + sum(steps(r) == 1 for r in mixed["warmup"]) == 400


def test_a_malformed_step_list_is_one_line_and_exit_2(tmp_path):
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "word_problems.py"), "--out", str(tmp_path),
                        "--warmup-steps", "1,two"], capture_output=True, text=True)
    assert p.returncode == 2 and "--warmup-steps" in p.stderr and "'1,two'" in p.stderr
    assert not (tmp_path / "test.jsonl").exists()
