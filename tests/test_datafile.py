"""Data files read at scale: one validating pass, records read on demand, a cached index, views."""

import json
import os
import random

import pytest

from handrail.data import datafile
from handrail.data.records import DataError, Record, Templates, parse_row
from handrail.data.datafile import Records, facts, load_records, shuffle_references

ROWS = [
    {"prompt": "2+2", "solution": "2+2=4\n#### 4", "answer": "4"},
    {"question": "Ivy has 3 cats and gets 2. How many?", "answer": "3+2=5\n#### 5"},  # GSM8K layout
    {"prompt": "x", "solution": "so \\boxed{7}"},  # MATH layout: the answer is the box
    {"prompt": "only an answer", "answer": 12},
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "draft"},
                  {"role": "user", "content": "again"}, {"role": "assistant", "content": "final", "accepted": True}]},
    {"prompt": "é ünïcode", "solution": "#### 1"},
]


def write(path, rows, blank_after: int | None = None, bom: bool = False):
    lines = [json.dumps(r, ensure_ascii=False) for r in rows]
    if blank_after is not None:
        lines.insert(blank_after, "   ")
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + ("\n".join(lines) + "\n").encode())
    return path


def eager(path, rows, blank_after=None):
    out, line = [], 0
    for i, row in enumerate(rows):
        line = i + 1 + (blank_after is not None and i >= blank_after)
        out += parse_row(row, f"{path}:{line}")
    return out


def test_a_file_reads_as_the_records_its_rows_make(tmp_path):
    f = write(tmp_path / "d.jsonl", ROWS, blank_after=2, bom=True)
    recs = load_records(f)
    assert isinstance(recs, Records) and len(recs) == 7  # the conversation gives two turns
    assert list(recs) == eager(f, ROWS, blank_after=2)
    assert recs[-1].prompt == "é ünïcode" and recs[1].answer == "5" and recs[2].answer == "7"
    assert recs[4].completion == "draft" and recs[5].completion == "final" and recs[5].source.endswith("(turn 3)")
    assert recs[1:3] == list(recs)[1:3] and recs[-7] == recs[0]
    with pytest.raises(IndexError):
        recs[7]
    assert facts(recs) == facts(list(recs)) == datafile.Facts(7, 2, 1, f"{f}:1")
    assert random.Random(3).sample(recs, 3) == random.Random(3).sample(list(recs), 3)  # runs draw as from a list


def test_a_bad_row_on_any_line_is_named_before_anything_is_read(tmp_path):
    rows = [dict(ROWS[0]) for _ in range(50)]
    rows[37] = {"prompt": "p", "solution": 3}
    f = write(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError, match=r"d.jsonl:38: field 'solution': expected a string, got int$"):
        load_records(f)
    f.write_text(f.read_text() + "{oops\n")
    with pytest.raises(DataError, match=r"d.jsonl:38: .* \(1 more bad records\)"):
        load_records(f)


def test_the_index_of_a_large_file_is_cached_and_a_changed_file_is_read_again(tmp_path, monkeypatch):
    monkeypatch.setenv("HANDRAIL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(datafile, "CACHE_FROM", 3)
    f = write(tmp_path / "d.jsonl", ROWS)
    first = list(load_records(f))
    assert len(list((tmp_path / "cache" / "index").iterdir())) == 1

    def no_scan(self):
        raise AssertionError("scanned again")

    with monkeypatch.context() as m:
        m.setattr(datafile.RecordFile, "_scan", no_scan)
        again = load_records(f)
        assert list(again) == first and again.facts == facts(first)
    write(f, ROWS[:3])  # changed: a new size, so a new key
    assert len(load_records(f)) == 3
    index = next((tmp_path / "cache" / "index").iterdir())
    index.write_bytes(b"not an index")  # a damaged cache is read past, not trusted
    os.utime(f, ns=(1, 1))
    assert len(load_records(f)) == 3


def test_parquet_and_datasets_folders_read_on_demand(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [ROWS[0], ROWS[3], ROWS[5]]
    flat = [{k: r.get(k) for k in ("prompt", "solution", "answer")} for r in rows]
    for r in flat:
        r["answer"] = None if r["answer"] is None else str(r["answer"])
    ds = datasets.Dataset.from_list(flat)
    ds.save_to_disk(str(tmp_path / "ds"))
    ds.to_parquet(str(tmp_path / "d.parquet"))
    for path in (tmp_path / "ds", tmp_path / "d.parquet"):
        recs = load_records(path)
        assert isinstance(recs, Records) and [r.prompt for r in recs] == [r["prompt"] for r in flat]
        assert recs[1].solution is None and recs[1].answer == "12" and recs[2].source == f"{path}:3"
        assert facts(recs).answer_only == 1


def test_shuffled_references_of_a_file_are_the_lists(tmp_path):
    rows = [{"prompt": f"{i}+{i}", "solution": f"#### {2 * i}"} for i in range(30)]
    recs = load_records(write(tmp_path / "d.jsonl", rows))
    view = shuffle_references(recs, seed=5)
    assert isinstance(view, Records) and list(view) == shuffle_references(list(recs), seed=5)
    assert all(r.solution != f"#### {r.answer}" for r in view)  # a derangement, each checked against its own
    assert [r.answer for r in view] == [str(2 * i) for i in range(30)]


class CharTokenizer:
    chat_template = None

    def __call__(self, texts, add_special_tokens=False):
        if isinstance(texts, str):
            return {"input_ids": [ord(c) for c in texts]}
        return {"input_ids": [[ord(c) for c in t] for t in texts]}

    def decode(self, ids):
        return "".join(map(chr, ids))


def test_a_prompt_too_long_is_named_before_training_and_truncated_when_asked(tmp_path):
    from handrail.runtime.evaluate import PromptIds, fit_records

    tok, t = CharTokenizer(), Templates(student="Q {prompt}", teacher="Q {prompt} H {solution}")
    rows = [{"prompt": f"{i}+{i}", "solution": f"#### {2 * i}"} for i in range(40)]
    rows[31] = {"prompt": "long " * 30 + "1+1", "solution": "#### 2"}
    recs = load_records(write(tmp_path / "d.jsonl", rows))
    with pytest.raises(DataError, match=r"d.jsonl:32: field 'prompt': \d+ tokens with its template, more than the 40"):
        fit_records(tok, recs, t, 40, "error", ("none", "solution"), PromptIds(tok, t))
    fitted = fit_records(tok, recs, t, 40, "left", ("none", "solution"), PromptIds(tok, t))
    assert list(fitted.fixed) == [31] and fitted[31].prompt.endswith("1+1") and fitted[0] == recs[0]
    assert list(fitted) == fit_records(tok, list(recs), t, 40, "left", ("none", "solution"))


def test_arrows_pass_over_a_plain_file_makes_the_index_the_python_pass_makes(tmp_path, monkeypatch):
    rows = [{"prompt": f"{i} + {i} ü", "solution": f"{i}+{i}={2 * i}\n#### {2 * i}", "answer": 2 * i, "id": i}
            for i in range(300)]
    f = write(tmp_path / "d.jsonl", rows, blank_after=100)
    f.write_bytes(f.read_bytes() + b'{"prompt": "last", "solution": "#### 0"}')  # no newline at the end
    fast = load_records(f)
    assert fast.facts == datafile.Facts(301, 0, 0, f"{f}:1")
    with monkeypatch.context() as m:
        m.setattr(datafile.RecordFile, "_scan_arrow", lambda self: False)
        slow = load_records(f)
    assert (fast.rows, fast.lines, fast.sizes, fast.turns) == (slow.rows, slow.lines, slow.sizes, slow.turns)
    assert list(fast) == list(slow) and fast[100].source == f"{f}:102" and fast[-1].prompt == "last"
    calls = []
    monkeypatch.setattr(datafile.RecordFile, "_scan", lambda self: calls.append(1) or slow._scan.__func__(self))
    load_records(f)
    assert calls == []  # the plain file never needed the Python pass
