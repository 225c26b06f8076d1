"""Every bad input through the CLI: exit status 2, one line on stderr naming the file (and line
and field) or the option, no traceback, and nothing created or changed on disk.

Cases run in-process through `handrail.cli.main`, so a traceback is an exception that fails the
test; the whole table takes seconds."""

import json
import os
import shutil
from pathlib import Path

import pytest

from handrail.cli import main


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else None
            for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def lab(tmp_path_factory, tiny_model):
    """Files the cases point at: good and damaged models, data files, configs, run folders."""
    root = tmp_path_factory.mktemp("lab")
    good = root / "good.jsonl"
    good.write_text(json.dumps({"prompt": "1+1", "solution": "1+1=2\n#### 2"}) + "\n")
    (root / "notjson.jsonl").write_text('{"prompt": "a", "solution": "b"}\n{"prompt": \n')
    (root / "latin1.jsonl").write_bytes(b'{"prompt": "caf\xe9", "solution": "x"}\n')
    (root / "msgstr.jsonl").write_text(json.dumps({"messages": "hello", "solution": "x"}) + "\n")
    (root / "nosolution.jsonl").write_text(json.dumps({"prompt": "a"}) + "\n")
    (root / "long.jsonl").write_text(json.dumps({"prompt": "1" * 5000, "solution": "x\n#### 1"}) + "\n")
    (root / "list.yaml").write_text("- a\n- b\n")
    (root / "badkey.yaml").write_text("nonsense_key: 3\n")
    (root / "badlr.yaml").write_text("rollouts: 64\nlr: fast\n")
    (root / "negseed.yaml").write_text("# a comment\nseed: 1\n\nmax_new_tokens: -2\n")
    (root / "short.csv").write_text("prompt,solution\n1+1,#### 2\n2+2\n")
    (root / "broken.yaml").write_text("rollouts: 64\nmethods: [grpo\n")
    (root / "afile").write_text("x")
    for name, damage in (("truncated", lambda b: b[: len(b) // 2]), ("garbage", lambda b: b"\x00garbage" * 100)):
        folder = root / name
        shutil.copytree(tiny_model, folder)
        w = folder / "model.safetensors"
        w.write_bytes(damage(w.read_bytes()))
    notok = root / "notokenizer"
    shutil.copytree(tiny_model, notok)
    for f in notok.glob("tokenizer*"):
        f.unlink()
    (root / "noconfig").mkdir()
    run = root / "run"  # a run folder whose checkpoint's state.json is damaged
    (run / "checkpoint" / "model").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"model": tiny_model, "out": str(run)}))
    (run / "checkpoint" / "state.json").write_text("{not json")
    (root / "norun").mkdir()
    return root


M = "{model}"
CASES = [
    # (command line, what the message must name)
    # -- config values: types, ranges, choices, cross-field rules
    ("train --model {model} --out {tmp}/o prompts_per_step=0", "prompts_per_step"),
    ("train --model {model} --out {tmp}/o samples_per_prompt=0", "samples_per_prompt"),
    ("train --model {model} --out {tmp}/o max_new_tokens=0", "max_new_tokens"),
    ("train --model {model} --out {tmp}/o threads=-1", "threads"),
    ("train --model {model} --out {tmp}/o --rollouts 0", "rollouts"),
    ("train --model {model} --out {tmp}/o --rollouts -5", "rollouts"),
    ("train --model {model} --out {tmp}/o rollouts=2.5", "rollouts"),
    ("train --model {model} --out {tmp}/o --rollouts 4 prompts_per_step=16", "rollouts"),
    ("train --model {model} --out {tmp}/o lr=inf", "lr"),
    ("train --model {model} --out {tmp}/o lr=nan", "lr"),
    ("train --model {model} --out {tmp}/o lr=-1", "lr"),
    ("train --model {model} --out {tmp}/o delta=-1", "delta"),
    ("train --model {model} --out {tmp}/o temperature=-1", "temperature"),
    ("train --model {model} --out {tmp}/o top_p=1.5", "top_p"),
    ("train --model {model} --out {tmp}/o eval_every=-1", "eval_every"),
    ("train --model {model} --out {tmp}/o --rule bogus", "rule"),
    ("train --model {model} --out {tmp}/o --method bogus", "method"),
    ("train --model {model} --out {tmp}/o mixed_precision=fp8", "mixed_precision"),
    ("train --model {model} --out {tmp}/o verifier=nope", "verifier"),
    ("train --model {model} --out {tmp}/o verifier=no_such_module_xyz:f", "verifier"),
    ("train --model {model} --out {tmp}/o fields=question=q", "fields"),
    ("train --model {model} --out {tmp}/o lora_r=-1", "lora_r"),
    ("train --model {model} --out {tmp}/o lora_r=4 teacher=ema", "teacher"),
    ("train --model {model} --out {tmp}/o lora_merge=true", "lora_merge"),
    ("train --model {model} --out {tmp}/o --method srpo", "samples_per_prompt"),
    ("train --model {model} --out {tmp}/o teacher_weight_clip=2", "teacher_weight_clip"),
    ("train --model {model} --out {tmp}/o --method vine vine_k=0", "vine_k"),
    ("train --model {model} --out {tmp}/o --method vine --rollouts 8", "vine_points x vine_k"),
    ("train --model {model} --out {tmp}/o step_delimiter=", "step_delimiter"),
    ("train --model {model} --out {tmp}/o curriculum=brevity", "curriculum"),
    ("train --model {model} --out {tmp}/o --method grpo samples_per_prompt=4 curriculum=shorter", "curriculum"),
    ("train --model {model} --out {tmp}/o --method grpo samples_per_prompt=4 curriculum=brevity eval_every=0", "eval_every"),
    ("train --model {model} --out {tmp}/o --method grpo samples_per_prompt=4 curriculum=brevity "
     "--data {lab}/good.jsonl", "curriculum_data"),
    ("train --model {model} --out {tmp}/o --method expert-iteration search_value=check --data {lab}/good.jsonl",
     "search_value"),
    ("train --model {model} --out {tmp}/o teacher_topk=-1", "teacher_topk"),
    ("train --model {model} --out {tmp}/o fsdp=true lora_r=4", "fsdp"),
    ("train --model {model} --out {tmp}/o fsdp=true mixed_precision=fp16", "fsdp"),
    ("search --model {model} --temperature 0", "--temperature"),
    ("search --model {model} --c-puct -1", "--c-puct"),
    ("search --model {model} --delimiter=", "--delimiter"),
    ("search --model {model} --simulations 0", "--simulations"),
    ("search --model {model} --data {lab}/good.jsonl --value check", "--value"),
    ("search --model {model} oops=1", "oops"),
    ("search --model {model} --out {lab}/nodir/rows.jsonl", "--out"),
    ("search --model {model} --out {lab}", "--out"),
    ("eval --model {model} --data {lab}/good.jsonl --verifier nope", "--verifier"),
    ("eval --model {model} --data {lab}/good.jsonl --fields prompt", "--fields"),
    ("compare --model {model} --out {tmp}/o --methods self-distill+gate", "methods"),
    ("train --model {model} --out {tmp}/o scale_rewards=maybe", "scale_rewards"),
    ("train --model {model} --out {tmp}/o nonsense_key=1", "nonsense_key"),
    ("train --model {model} --out {tmp}/o --method grpo samples_per_prompt=1", "samples_per_prompt"),
    ("train --model {model} --out {tmp}/o oops", "oops"),
    ("train --model {model} --out {tmp}/o --config {lab}/missing.yaml", "missing.yaml"),
    ("train --model {model} --out {tmp}/o --config {lab}/list.yaml", "list.yaml"),
    ("train --model {model} --out {tmp}/o --config {lab}/badkey.yaml", "badkey.yaml:1: unknown config key 'nonsense_key'"),
    ("train --model {model} --out {tmp}/o --config {lab}/badlr.yaml", "badlr.yaml:2: config key 'lr'"),
    ("train --model {model} --out {tmp}/o --config {lab}/negseed.yaml", "negseed.yaml:4: config key 'max_new_tokens'"),
    ("train --model {model} --out {tmp}/o --config {lab}/broken.yaml", "broken.yaml:3: not valid YAML"),
    ("train --model {model} --out {tmp}/o {lab}/badlr.yaml", "--config"),
    ("pretrain --out {tmp}/p max_steps=-5", "max_steps"),
    ("pretrain --out {tmp}/p d_model=30", "d_model"),
    ("pretrain --out {tmp}/p threads=-1", "threads"),
    ("pretrain --out {tmp}/p hard_frac=1.5", "hard_frac"),
    ("pretrain --out {tmp}/p batch_size=0", "batch_size"),
    ("pretrain --out {tmp}/p lr=inf", "lr"),
    ("pretrain --out {tmp}/p levels=1,x", "levels"),
    ("compare --model {model} --out {tmp}/c --methods self-distill,bogus", "bogus"),
    ("compare --model {model} --out {tmp}/c --rollouts 0", "rollouts"),
    ("compare --model {model} --out {tmp}/c --seeds 0", "seeds"),
    ("compare --model {model} --out {tmp}/c scenarios=bogus", "scenarios"),
    ("compare --model {model} --out {tmp}/c train=lr=inf", "lr"),
    ("eval --model {model} --batch-size 0", "--batch-size"),
    ("eval --model {model} --samples -1", "--samples"),
    ("eval --model {model} --n 0", "--n"),
    ("eval --model {model} --max-new-tokens 0", "--max-new-tokens"),
    ("eval --model {model} --n 2.5", "--n"),
    ("eval --model {model} lr=1", "lr=1"),
    ("eval --model {model} --config {lab}/badkey.yaml", "--config"),
    ("eval --model {model} --hint bogus", "--hint"),
    ("eval --model {model} --level 99", "--level 99"),
    ("eval --model {model} --temperature -1", "--temperature"),
    ("eval --model {model} --data {lab}/noconfig", "noconfig"),
    ("decode --model {model} --rule considered", "--rule"),
    ("decode --model {model} --delta -1", "--delta"),
    ("decode --model {model} --max-new-tokens 0", "--max-new-tokens"),
    ("decode --model {model} --prompt 1+1", "--solution"),
    # -- models
    ("eval --model {lab}/nosuchfolder", "nosuchfolder"),
    ("eval --model {lab}/noconfig", "noconfig"),
    ("eval --model {lab}/truncated", "truncated"),
    ("eval --model {lab}/garbage", "garbage"),
    ("eval --model {lab}/notokenizer", "notokenizer"),
    ("train --model {lab}/truncated --out {tmp}/o", "truncated"),
    ("eval --model {model} --templates {lab}/afile", "afile"),
    ("train --model {model} --out {tmp}/o templates={lab}/list.yaml", "list.yaml"),
    # -- data
    ("eval --model {model} --data {lab}/missing.jsonl", "missing.jsonl"),
    ("eval --model {model} --data {lab}/notjson.jsonl", "notjson.jsonl:2"),
    ("eval --model {model} --data {lab}/latin1.jsonl", "latin1.jsonl:1"),
    ("eval --model {model} --data {lab}/msgstr.jsonl", "msgstr.jsonl:1: field 'messages'"),
    ("eval --model {model} --data {lab}/nosolution.jsonl", "nosolution.jsonl:1"),
    ("eval --model {model} --data {lab}/long.jsonl", "long.jsonl:1"),
    ("train --model {model} --data {lab}/long.jsonl --out {tmp}/o", "long.jsonl:1"),
    ("train --model {model} --data {lab}/notjson.jsonl --out {tmp}/o", "notjson.jsonl:2"),
    ("eval --model {model} --data {lab}/short.csv", "short.csv:3"),
    ("pretrain --data {lab}/good.jsonl --out {tmp}/p max_steps=2", "good.jsonl"),
    # -- output folders
    ("train --model {model} --out {lab}/afile", "afile"),
    ("train --model {model} --out {lab}/afile/under", "afile"),
    ("pretrain --out {lab}/afile", "afile"),
    ("pretrain --out {lab}/afile/under max_steps=1", "afile"),
    ("compare --model {model} --out {lab}/afile", "afile"),
    ("compare --model {model} --out {lab}/afile/x/y", "afile"),
    # -- resuming
    ("train --resume {lab}/norun", "norun"),
    ("train --resume {lab}/run", "state.json"),
    ("train --resume {lab}/run --rollouts 5", "--rollouts"),
]


@pytest.mark.parametrize("line,named", CASES, ids=[c[0].split(" --")[0] + ":" + c[1] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(line, named, lab, tiny_model, tmp_path, capsys):
    argv = line.format(model=tiny_model, lab=lab, tmp=tmp_path).split()
    before_lab, before_tmp = _snapshot(lab), _snapshot(tmp_path)
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own checks exit this way, with the same one-line contract
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("handrail") and named in lines[0], err
    assert _snapshot(lab) == before_lab and _snapshot(tmp_path) == before_tmp  # nothing created or changed


def test_a_byte_order_mark_is_read_not_rejected(tmp_path, tiny_model, capsys):
    data = tmp_path / "bom.jsonl"
    data.write_bytes("\ufeff".encode() + (json.dumps({"prompt": "1+1", "solution": "1+1=2\n#### 2"}) + "\n").encode())
    assert main(["eval", "--model", tiny_model, "--data", str(data), "--samples", "0", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 1


def test_a_model_folder_without_handrail_json_says_which_templates_it_gets(tmp_path, tiny_model, capsys):
    folder = tmp_path / "foreign"
    shutil.copytree(tiny_model, folder)
    (folder / "handrail.json").unlink()
    args = ["eval", "--model", str(folder), "--n", "2", "--samples", "0", "--json"]
    assert main(args) == 0
    assert "default English prompt templates" in capsys.readouterr().err
    own = tmp_path / "templates.json"
    own.write_text(json.dumps(json.loads((Path(tiny_model) / "handrail.json").read_text())["templates"]))
    assert main(args + ["--templates", str(own)]) == 0
    assert "templates" not in capsys.readouterr().err


def test_truncate_left_keeps_the_end_of_a_prompt_too_long_for_the_model(tiny_model):
    from handrail.data.records import Record
    from handrail.runtime.evaluate import fit_records, prompt_ids, prompt_limit
    from handrail.runtime.models import load_model

    model, tok, tpl = load_model(tiny_model)
    limit = prompt_limit(model, 24)
    rec = Record("1" * 5000 + "+2", "3+2=5\n#### 5", source="f:1")
    fitted = fit_records(tok, [rec], tpl, limit, "left")[0]
    assert fitted.prompt.endswith("1+2") and len(fitted.prompt) < len(rec.prompt)
    assert max(len(ids) for h in ("none", "solution") for ids in prompt_ids(tok, [fitted], tpl, h)) <= limit
    short = Record("1+2", "1+2=3\n#### 3", source="f:2")
    assert fit_records(tok, [short], tpl, limit, "error") == [short]
    with pytest.raises(Exception, match="f:1: field 'prompt'"):
        fit_records(tok, [short, rec], tpl, limit, "error")


def test_argument_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--rollouts", "many"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--rollouts" in err[0]
    assert os.environ.get("HF_HUB_OFFLINE") == "1"


def test_a_value_given_on_the_line_replaces_the_files_and_errors_name_where_a_value_came_from(tmp_path):
    from handrail import config as C
    from handrail.commands.train import TrainConfig

    f = tmp_path / "run.yaml"
    f.write_text("model: m\nlr: fast\nrollouts: 32\n")
    assert C.build(TrainConfig, f, ["lr=1e-4"]).lr == 1e-4  # the file's bad lr is never read
    with pytest.raises(C.ConfigError, match=r"run\.yaml:2: config key 'lr'"):
        C.build(TrainConfig, f)
    with pytest.raises(C.ConfigError, match=r"^config key 'rollouts'"):  # the line's value: no file blamed
        C.build(TrainConfig, f, ["lr=1e-4", "rollouts=0"])
