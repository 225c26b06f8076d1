"""Failed writes (a full disk, a read-only filesystem) and one run per folder."""

import errno
import json
import subprocess
import sys
import time

import pytest
import torch

from handrail import cli
from handrail.folders import FolderLock, WriteError, writing

TINY = ["prompts_per_step=8", "max_new_tokens=24", "eval_n=0", "train_n=64", "level=2", "threads=1"]


def test_a_full_disk_at_a_checkpoint_is_one_line_exit_4_and_the_previous_checkpoint_resumes(
        tiny_model, tmp_path, monkeypatch, capsys):
    import handrail.runtime.checkpoint as train_module  # where checkpoints are written

    real, calls = train_module.save_model, []

    def short_write(model, tokenizer, folder, *a, **kw):
        calls.append(folder)
        if len(calls) == 2:  # the second checkpoint: part of it lands, then the disk is full
            (folder).mkdir(parents=True, exist_ok=True)
            (folder / "model.safetensors").write_bytes(b"\0" * 1000)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(model, tokenizer, folder, *a, **kw)

    monkeypatch.setattr(train_module, "save_model", short_write)
    out = tmp_path / "r"
    code = cli.main(["train", "--model", tiny_model, "--out", str(out), "--rollouts", "48",
                     "checkpoint_every=2", *TINY])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if not line.startswith("train self-distill:")]  # the bar's
    assert code == 4 and len(lines) == 1 and err.splitlines()[-1] == lines[0] and "Traceback" not in err
    assert lines[0].startswith("handrail train: error: ")
    assert "checkpoint.tmp: cannot write (No space left on device" in lines[0]
    assert not (out / "checkpoint.tmp").exists()  # the half-written checkpoint is gone
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 2  # the good one stays
    monkeypatch.setattr(train_module, "save_model", real)
    assert cli.main(["train", "--resume", str(out)]) == 0
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 6


def test_torchs_own_short_write_error_is_a_write_error_and_others_pass_through(tmp_path):
    folder = tmp_path / "c"
    folder.mkdir()
    (folder / "x").write_text("half")
    with pytest.raises(WriteError, match=r"c: cannot write \(\[enforce fail at inline_container"):
        with writing(folder, partial=folder):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
    assert not folder.exists()
    with pytest.raises(WriteError, match="f.json: cannot write \\(Read-only file system"):
        with writing(tmp_path / "f.json", partial=tmp_path / "f.json"):
            raise OSError(errno.EROFS, "Read-only file system")
    with pytest.raises(ZeroDivisionError):  # a bug is not a write failure
        with writing(tmp_path / "g"):
            1 / 0


def test_a_folder_lock_is_held_by_one_process_and_freed_when_it_is_killed(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom handrail.folders import FolderLock\n"
                               f"lock = FolderLock({str(tmp_path / 'run')!r})\nprint('held', flush=True)\n"
                               "time.sleep(600)"], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(ValueError, match=rf"another run \(pid {holder.pid}\) is using this folder"):
        FolderLock(tmp_path / "run")
    holder.kill()  # SIGKILL: no cleanup runs, and the kernel drops the lock anyway
    holder.wait()
    with FolderLock(tmp_path / "run") as lock:
        assert lock.file is not None
    with FolderLock(tmp_path / "run"):  # released on exit: taken again
        pass


def test_two_compares_into_one_folder_one_is_refused(tiny_model, tmp_path):
    out = tmp_path / "cmp"
    with FolderLock(out):
        code = cli.main(["compare", "--model", tiny_model, "--methods", "sft", "--rollouts", "8", "--seeds", "1",
                         "--out", str(out), "samples_per_step=8"])
    assert code == 2 and not (out / "compare_config.json").exists()


def test_a_sigterm_while_the_libraries_load_ends_in_one_line_and_143(monkeypatch, capsys, tmp_path):
    """benchmarks/soak.py found it: a SIGTERM during transformers' import gave a traceback and exit 1."""
    import signal

    from handrail import cli

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(cli, "_quiet_libraries", lambda: cli._terminated(signal.SIGTERM, None))
    try:
        assert cli.main(["train", "--out", str(tmp_path / "r"), "--rollouts", "8"]) == 143
    finally:
        signal.signal(signal.SIGTERM, before)
    err = capsys.readouterr().err
    assert err.startswith("handrail train: terminated (SIGTERM)") and err.count("\n") == 1
    assert not (tmp_path / "r").exists()
