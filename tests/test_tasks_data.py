import json
import random

import pytest

from handrail.data.records import DataError, Record, Templates, hint_for, reference_answer, student_prompt, teacher_prompt
from handrail.data.datafile import load_records
from handrail.data.answers import extract_answer
from handrail.data.tasks import TASKS, get_task


@pytest.mark.parametrize("name", list(TASKS))
def test_reference_solutions_verify_and_do_not_leak(name):
    task = get_task(name)
    for level in task.levels:
        for p in task.split("test", 20, level):
            assert task.verify(p.solution, p.answer)
            assert not task.leaked(p.solution, level)
            assert len(p.solution.splitlines()) == level + 1  # level steps + the answer line
    assert task.leaked("#### 42", 3) and not task.verify("no answer here", "42")


@pytest.mark.parametrize("name", list(TASKS))
def test_splits_are_deterministic_and_disjoint(name):
    task = get_task(name)
    test = {p.prompt for p in task.split("test", task.test_size)}
    assert len(test) == task.test_size
    assert test == {p.prompt for p in task.split("test", task.test_size)}
    train = task.split("train", 3000, seed=1)
    assert not test & {p.prompt for p in train}
    assert [p.prompt for p in train[:5]] == [p.prompt for p in task.split("train", 5, seed=1)]


def test_sum_task_has_several_solution_orders():
    task = get_task("sum")
    p = task.make(random.Random(3), 4)
    nums = [int(x) for x in p.prompt.split()[1:]]
    other = "\n".join(f"{a}+{b}={a + b}" for a, b in zip([sum(nums[:i]) for i in range(1, len(nums))], nums[1:]))
    assert task.verify(other + f"\n#### {sum(nums)}", p.answer)
    problems = task.split("test", 50)
    assert sum(p.solution.split("+")[0] != p.prompt.split()[1] for p in problems) > 25  # mostly not prompt order


def test_misconception_is_the_stated_rule_and_work_continues_from_it():
    chain, sum_ = get_task("chain"), get_task("sum")
    assert chain.misconception(42, "-", 8) == 46 and chain.misconception(48, "-", 2) is None
    assert chain.misconception(42, "+", 8) is None
    assert sum_.misconception(37, "+", 15) == 42 and sum_.misconception(37, "+", 5) is None
    sol = "42-8=34\n34+5=39\n#### 39"
    assert chain.rewrite(sol, "student", random.Random(0), 1.0) == "42-8=46\n46+5=51\n#### 51"
    assert chain.rewrite(sol, "student", random.Random(0), 0.0) == sol


@pytest.mark.parametrize("name", list(TASKS))
def test_rewritten_references_verify_and_terse_ones_still_show_the_work(name):
    task = get_task(name)
    problems = task.split("test", 200)
    for p in problems:
        terse = task.rewrite(p.solution, "terse")
        assert task.verify(terse, p.answer) and not task.leaked(terse, p.level)
        assert len(terse.splitlines()) == -(-p.level // 2) + 1  # two operations per line
        assert task.verify(task.rewrite(p.solution, "full"), p.answer)
    # with the misconception always on, only problems it never touches stay right: the cap on
    # the student's greedy accuracy that makes the default base weak by construction
    right = sum(task.verify(task.rewrite(p.solution, "student", random.Random(0), 1.0), p.answer) for p in problems)
    assert 0.05 * len(problems) < right < 0.40 * len(problems)
    assert task.leaked("37+5-8=34\n#### 34", 4) and not task.leaked("37+5-8=34\n34+1-2=33\n#### 33", 4)


def test_extract_answer():
    assert extract_answer("1+2=3\n#### 3\n") == "3"
    assert extract_answer("#### 1\n#### 2") == "2"
    assert extract_answer("none") is None


def write(tmp_path, lines):
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(lines) + "\n")
    return f


def test_loads_prompt_messages_alias_and_numeric_answer(tmp_path):
    f = write(tmp_path, [
        json.dumps({"prompt": "2+2?", "solution": "2+2=4\n#### 4"}),
        json.dumps({"messages": [{"role": "user", "content": "3+3?"}], "privileged_context": "6"}),
        json.dumps({"prompt": "5+5?", "answer": 10}),
    ])
    recs = load_records(f)
    assert [r.text for r in recs] == ["2+2?", "3+3?", "5+5?"]
    assert recs[1].solution == "6" and recs[2].answer == "10"
    assert reference_answer(recs[0]) == "4" and hint_for(recs[2], "answer") == "#### 10"
    assert recs[0].source.endswith("d.jsonl:1")


@pytest.mark.parametrize("bad, expected", [
    ("{not json", r"d.jsonl:2: not valid JSON"),
    (json.dumps({"solution": "x"}), r"d.jsonl:2: field 'prompt': missing"),
    (json.dumps({"prompt": "q", "solution": 3}), r"d.jsonl:2: field 'solution': expected a string"),
    (json.dumps({"prompt": "q"}), r"d.jsonl:2: field 'solution': missing"),
    (json.dumps({"prompt": "q", "answer": [1]}), r"d.jsonl:2: field 'answer'"),
    (json.dumps({"messages": [{"role": "assistant", "content": "hi"}], "answer": "1"}),
     r"d.jsonl:2: field 'messages': the last message must be a user turn"),
    (json.dumps({"messages": [{"role": "bot", "content": "hi"}], "answer": "1"}), r"d.jsonl:2: field 'messages\[0\]'"),
    (json.dumps({"question": "", "answer": "x\n#### 1"}), r"d.jsonl:2: field 'question': expected a non-empty"),
    (json.dumps({"problem": "q", "solution": 7}), r"d.jsonl:2: field 'solution': expected a string"),
])
def test_bad_records_name_file_line_and_field(tmp_path, bad, expected):
    f = write(tmp_path, [json.dumps({"prompt": "ok", "answer": "1"}), bad, bad])
    with pytest.raises(DataError, match=expected + r".*\(1 more bad records\)"):
        load_records(f)


def test_common_layouts_load_as_they_are_and_fields_map_the_rest(tmp_path):
    f = write(tmp_path, [
        json.dumps({"question": "Tom has 3 apples and buys 4. How many?", "answer": "3+4=7\n#### 7"}),  # GSM8K
        json.dumps({"problem": "What is $\\frac{1}{2}+\\frac{1}{4}$?",
                    "solution": "Add: $\\frac{2}{4}+\\frac{1}{4}=\\boxed{\\frac{3}{4}}$."}),  # MATH
    ])
    gsm, math = load_records(f)
    assert gsm.text.startswith("Tom") and gsm.solution == "3+4=7\n#### 7" and gsm.answer == "7"
    assert math.answer == "\\frac{3}{4}" and "boxed" in math.solution
    g = write(tmp_path, [json.dumps({"query": "1+1?", "target": "#### 2"})])
    rec, = load_records(g, fields="prompt=query,solution=target")
    assert rec.text == "1+1?" and reference_answer(rec) == "2"
    with pytest.raises(DataError, match=r"d.jsonl:1: field 'prompt': missing.*fields=prompt=NAME"):
        load_records(g)
    with pytest.raises(ValueError, match="config key 'fields'"):
        load_records(g, fields="question=query")


def test_verifiers_exact_math_and_a_users_function(tmp_path, monkeypatch):
    from handrail.data.verifiers import FileTask, load

    exact = FileTask("exact")
    assert exact.verify("2+2=4\n#### 4", "4") and not exact.verify("#### 5", "4")
    rec = Record("What is 2+2?", "2+2=4\n#### 4", "4")
    assert exact.leak("#### 4\n2+2=4", rec) and not exact.leak("2+2=4\n#### 4", rec)
    assert exact.leak("The answer is 4. Two and two make four.", rec)  # free text leaks too
    assert not exact.verify("2+2=4, so the answer is 4.", "4") and exact.verify_lenient("2+2=4, so the answer is 4.", "4")
    (tmp_path / "myverify.py").write_text("def check(completion, answer):\n    return answer in completion\n"
                                          "def ends(completion, answer):\n    return completion.endswith(answer)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    mine = FileTask("myverify:check")
    assert mine.verify("the answer is 42", "42") and not mine.verify("41", "42")
    # a user's verifier is its own judge: its lenient score is its strict one (rewritten as '#### 42'
    # this completion would end with the answer)
    assert not FileTask("myverify:ends").verify_lenient("42 is the answer", "42")
    for bad, msg in (("nope", "expected exact, math or module:function"), ("myverify:missing", "cannot load"),
                     ("no_such_module_x:f", "cannot load")):
        with pytest.raises(ValueError, match="config key 'verifier': " + msg):
            load(bad)
    pytest.importorskip("math_verify")
    m = FileTask("math")
    assert m.verify("so the total is \\boxed{\\frac{3}{4}}", "\\frac{3}{4}")
    assert m.verify("3/4=0.75\n#### 0.75", "\\frac{3}{4}")  # the marked answer, in another form
    assert not m.verify("#### 0.7", "\\frac{3}{4}") and not m.verify("no answer here", "3")


def test_parquet_and_datasets_folder(tmp_path):
    import datasets

    rows = [{"prompt": "1+1?", "solution": "#### 2"}, {"prompt": "", "solution": "#### 3"}]
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    with pytest.raises(DataError, match=r"d.parquet:2: field 'prompt'"):
        load_records(tmp_path / "d.parquet")
    datasets.Dataset.from_list(rows[:1]).save_to_disk(str(tmp_path / "ds"))
    assert load_records(tmp_path / "ds")[0].solution == "#### 2"


def test_csv_and_tsv_rows_are_named_by_the_line_they_start_on(tmp_path):
    f = tmp_path / "d.csv"
    # a quoted solution spans two lines; an empty cell is an absent field; blank lines are skipped
    f.write_text('question,answer,note\n"2+2?","2+2=4\n#### 4",\n\n3+3?,#### 6,x\n')
    recs = load_records(f)
    assert [(r.prompt, r.solution, r.source) for r in recs] == [
        ("2+2?", "2+2=4\n#### 4", f"{f}:2"), ("3+3?", "#### 6", f"{f}:5")]
    f.write_text('prompt,solution\na,#### 1\n"b\nc",\nd\n')
    with pytest.raises(DataError, match=r"d.csv:3: .*\(1 more bad records\)"):  # no solution; then a short row
        load_records(f)
    t = tmp_path / "d.tsv"
    t.write_text("prompt\tsolution\n1+1?\t#### 2\n")
    assert load_records(t)[0].solution == "#### 2"
    t.write_bytes(b"prompt\tsolution\n1+1?\t#### 2\n\xff\tx\n")
    with pytest.raises(DataError, match=r"d.tsv:3: not UTF-8"):
        load_records(t)


class FakeChatTokenizer:
    chat_template = "yes"

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        return "|".join(f"{m['role']}:{m['content']}" for m in messages) + "|assistant:"


def test_prompts_use_templates_and_chat_template():
    rec = Record(prompt=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"}],
                 solution="#### 4")
    t = Templates(student="Q {prompt}", teacher="Q {prompt} H {solution}")
    assert student_prompt(None, rec, t) == "system: be brief\nuser: Q 2+2?\nassistant: "
    assert teacher_prompt(FakeChatTokenizer(), rec, t) == "system:be brief|user:Q 2+2? H #### 4|assistant:"
    assert teacher_prompt(None, Record("x", "s"), t, hint="#### 9") == "Q x H #### 9"


def test_hinted_only_levels_are_never_shown_to_the_student_alone():
    from handrail.data.records import records_from_task
    from handrail.runtime.models import build_char_tokenizer
    from handrail.commands.pretrain import PretrainConfig, build_examples

    task = get_task("chain")
    recs = records_from_task(task.split("train", 40, 2, seed=0) + task.split("train", 40, 5, seed=0))
    tok = build_char_tokenizer([r.text + r.solution + "[]#\n " for r in recs])
    cfg = PretrainConfig(hinted_only_levels="5", plain_frac=0.5)
    examples = build_examples(recs, cfg, tok, random.Random(0))
    hinted = [("[" in tok.decode(p)) for p, _, _ in examples]
    assert all(hinted[40:])  # level 5: always a teacher prompt
    assert 5 < sum(hinted[:40]) < 35  # level 2: the usual mix
    with pytest.raises(ValueError, match="config key 'levels'"):
        PretrainConfig(levels="1,x").validate()


def test_hardest_records_of_a_data_file_are_whole_lengths_from_the_longest_down():
    from handrail.commands.pretrain import hardest

    def rec(i, lines):
        return Record(f"p{i}", "\n".join(["1+1=2"] * lines + ["#### 2"]), source=f"f:{i}")

    recs = [rec(i, 1 + i % 3) for i in range(300)]  # a third each of 1, 2 and 3 lines
    picked = hardest(recs, 0.25, random.Random(0))
    assert picked == {i for i in range(300) if i % 3 == 2}  # all of the longest length, none else
    assert hardest(recs, 0.0, random.Random(0)) == set()
    same = [rec(i, 2) for i in range(100)]  # one length: a random quarter, not everything
    assert len(hardest(same, 0.25, random.Random(0))) == 25
    mixed = [rec(i, 5 if i < 10 else 2) for i in range(100)]  # 10 long ones, then 15 of the next length
    picked = hardest(mixed, 0.25, random.Random(0))
    assert len(picked) == 25 and set(range(10)) <= picked
    # four lengths, the longest just under a quarter: it alone, not the next length too
    near = [rec(i, 6 if i < 24 else 5 if i < 50 else 3) for i in range(100)]
    assert hardest(near, 0.25, random.Random(0)) == set(range(24))
    # the longest is a tenth, the next a fifth: 10 + 20 is nearer 25 than 10 is
    two = [rec(i, 6 if i < 10 else 5 if i < 30 else 3) for i in range(100)]
    assert hardest(two, 0.25, random.Random(0)) == set(range(30))


def test_band_names_the_side_that_was_missed():
    from handrail.commands.pretrain import band

    assert band(0.2, 0.9)["ok"]
    assert "too little to learn from" in band(0.01, 0.9)["message"]
    assert "little room to learn" in band(0.6, 0.9)["message"]
    assert "misconception" not in band(0.6, 0.9, task=False)["message"]  # a data file has none to tune
    assert "hard_frac" in band(0.6, 0.9, task=False)["message"]
    low_teacher = band(0.2, 0.5)
    assert not low_teacher["ok"] and "teacher" in low_teacher["message"] and "max_steps" in low_teacher["message"]


def test_pretraining_examples_teach_the_teacher_to_copy_on_path_and_work_from_a_slip():
    """A detour example learns the reference's steps while on its path and the correct steps after
    a slip, and never the slip itself; the student's own solutions carry the misconception."""
    from handrail.data.records import records_from_task
    from handrail.runtime.models import build_char_tokenizer
    from handrail.commands.pretrain import PretrainConfig, build_examples, collate

    task = get_task("chain")
    recs = records_from_task(task.split("train", 60, 4, seed=0))
    tok = build_char_tokenizer([r.text + r.solution + "[]#\n " for r in recs])
    detours = build_examples(recs, PretrainConfig(plain_frac=0, answer_hint_frac=0, terse_hint_frac=0,
                                                  detour_frac=1.0), tok, random.Random(0), task)
    for (p, c, unlearned), rec in zip(detours, recs):
        text = tok.decode(c, skip_special_tokens=True)
        slipped = tok.decode([c[i] for i in unlearned])
        assert slipped.endswith("\n") and slipped.strip().isdigit()
        head = tok.decode(c[:unlearned[0]])
        assert rec.solution.startswith(head)  # everything learned before the slip is the reference
        assert task.verify(text, str(int(text.rsplit("#### ", 1)[1]))) and text != rec.solution
    _, labels = collate(detours[:1], tok.pad_token_id)
    assert (labels[0] == -100).sum() == len(detours[0][0]) + len(detours[0][2])
    plain = build_examples(recs, PretrainConfig(plain_frac=1.0, direct_plain=0.0, misconception=1.0,
                                                misconception_levels="4"), tok, random.Random(0), task)
    own = [tok.decode(c, skip_special_tokens=True) for _, c, _ in plain]
    assert own == [task.rewrite(r.solution, "student", random.Random(0), 1.0) for r in recs]


def test_sum_detours_include_other_orders_and_slips():
    from handrail.data.records import records_from_task
    from handrail.runtime.models import build_char_tokenizer
    from handrail.commands.pretrain import PretrainConfig, build_examples

    task = get_task("sum")
    recs = records_from_task(task.split("train", 40, 3, seed=0))
    tok = build_char_tokenizer([r.text + r.solution + "[]#\n " for r in recs])
    ex = build_examples(recs, PretrainConfig(plain_frac=0, answer_hint_frac=0, terse_hint_frac=0, detour_frac=1.0),
                        tok, random.Random(0), task)
    kinds = {bool(unlearned) for _, _, unlearned in ex}
    assert kinds == {True, False}  # slips (with an unlearned value) and other orders (all learned)
    for (_, c, _), rec in zip(ex, recs):
        assert task.verify(tok.decode(c, skip_special_tokens=True), tok.decode(c, skip_special_tokens=True).rsplit("#### ", 1)[1])


class CountingTokenizer:
    """Character codes as token ids; counts the texts it is asked to tokenize."""
    chat_template = None

    def __init__(self):
        self.texts = 0

    def __call__(self, texts, add_special_tokens=False):
        self.texts += len(texts)
        return {"input_ids": [[ord(c) for c in t] for t in texts]}


def test_prompt_ids_are_made_once_per_prompt_text_within_the_budget():
    from handrail.runtime.evaluate import PromptIds, prompt_ids

    tok, t = CountingTokenizer(), Templates(student="Q {prompt}", teacher="Q {prompt} H {solution}")
    recs = [Record(f"{i}+{i}", f"#### {2 * i}") for i in range(5)]
    ids = PromptIds(tok, t)
    batch = [recs[0], recs[3], recs[0], recs[3]]  # a group's record comes back within one batch, too
    assert ids(batch) == prompt_ids(tok, batch, t) and tok.texts == 2 + 4
    assert ids(batch, "solution") == prompt_ids(tok, batch, t, "solution")
    before = tok.texts
    got = ids(batch)
    got[0].append(-1)  # a caller's edit reaches no other caller
    assert ids(batch) == prompt_ids(tok, batch, t) and tok.texts == before + 4  # (+4: the reference's own calls)
    small = PromptIds(tok, t, budget=len("Q 0+0"))  # room for one prompt: the rest tokenized per call
    assert small(recs[:2]) == small(recs[:2]) == prompt_ids(tok, recs[:2], t)
    assert list(small._known) == ["Q 0+0"]
    before = tok.texts  # a record read again from a file is a new object with the same prompt: no new call
    assert ids([Record("3+3", "#### 6")]) == ids([recs[3]]) and tok.texts == before
