"""`handrail probe`: the verdict from its figures, the verdict flipping on real models built to
ignore or to copy the reference, the command, and its page in a real headless browser."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from handrail.data.records import Record
from handrail.data.datafile import shuffle_references
from handrail.commands.probe import probe, verdict
from handrail.commands.train import TrainConfig

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def figures(student=0.3, teacher=0.8, other=0.3, leak_s=0.0, leak_t=0.0, gated=0.2, n=64, slip=None):
    r = {"n": n, "student": {"lenient": student, "strict": student, "leak": leak_s},
         "teacher": {"lenient": teacher, "strict": teacher, "leak": leak_t},
         "shuffled": {"lenient": other, "strict": other, "leak": 0.0}, "aggregate": {"gated": gated}}
    if slip:
        r["slip"] = dict(zip(("consistent", "copies_reference"), slip))
    return r


@pytest.mark.parametrize("kw, kind", [
    ({}, "helps"),
    ({"teacher": 0.35}, "ignores"),  # the reference lifts it 5 points over another's: chance at n=64
    ({"student": 0.4, "teacher": 0.2, "other": 0.2}, "ignores"),  # the teacher prompt itself hurts
    ({"other": 0.05}, "copies"),  # another record's reference drags it below the student alone
    ({"leak_t": 0.6}, "copies"),  # shown the reference, it states the answer first
    ({"slip": (0.2, 0.7)}, "copies"),  # after a slip, the reference's numbers
    ({"gated": 0.9}, "gated"),
    ({"teacher": 0.5, "other": 0.3, "n": 1000}, "helps"),  # 20 points is a lift at n=1000
])
def test_the_verdict_follows_the_figures(kw, kind):
    got, reason = verdict(figures(**kw))
    assert got == kind, reason
    assert reason and "%" in reason


def test_a_shuffled_reference_is_always_another_records():
    recs = [Record(f"p{i}", f"s{i}\n#### {i}") for i in range(7)]
    for seed in range(5):
        other = shuffle_references(recs, seed)
        assert sorted(r.solution for r in other) == sorted(r.solution for r in recs)
        assert all(o.solution != r.solution and o.prompt == r.prompt for o, r in zip(other, recs))
        assert [o.answer for o in other] == [str(i) for i in range(7)]  # each still checked against its own


def _digit_sums(path: Path, n: int, seed: int) -> None:
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        ds = [rng.randint(1, 9) for _ in range(3)]
        lines, acc = [], ds[0]
        for d in ds[1:]:
            lines.append(f"{acc}+{d}={acc + d}")
            acc += d
        rows.append({"prompt": "".join(map(str, ds)), "solution": "\n".join(lines + [f"#### {acc}"])})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def digit_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("digits")
    _digit_sums(folder / "train.jsonl", 1500, 0)
    _digit_sums(folder / "test.jsonl", 48, 1)
    return folder


def _build(out: Path, data: Path, **recipe) -> str:
    from handrail.commands.pretrain import PretrainConfig, pretrain

    pretrain(PretrainConfig(out=str(out), data=str(data), max_steps=250, d_model=48, n_layers=2, n_heads=2,
                            batch_size=32, eval_n=8, hard_frac=0.0, **recipe), log=lambda *_: None)
    return str(out)


def test_the_verdict_flips_between_a_teacher_that_ignores_the_reference_and_one_that_copies(digit_data, tmp_path):
    # never shown a hint in pretraining: the reference means nothing to it
    ignorer = _build(tmp_path / "ignorer", digit_data / "train.jsonl", plain_frac=1.0)
    # every hinted example it saw was shown the answer and stated it at once, while its own
    # solutions show the work: shown the answer (hint=answer, as a user with answer-only data
    # would train), it copies
    copier = _build(tmp_path / "copier", digit_data / "train.jsonl", plain_frac=0.5, answer_hint_frac=1.0,
                    direct_answer_hint=1.0, direct_plain=0.0)
    reports = {}
    for name, model in (("ignorer", ignorer), ("copier", copier)):
        cfg = TrainConfig(model=model, data=str(digit_data / "test.jsonl"), max_new_tokens=24, hint="answer")
        reports[name] = probe(cfg, n=48, log=lambda *_: None)
    ig, co = reports["ignorer"], reports["copier"]
    assert ig["verdict"] == "ignores", ig["reason"]
    assert co["verdict"] == "copies", co["reason"]
    # and for the reasons the verdicts give
    assert ig["teacher"]["lenient"] - ig["shuffled"]["lenient"] < 0.1
    assert co["teacher"]["leak"] > 0.5 > co["student"]["leak"]
    for r in reports.values():
        assert r["n"] == 48 and 0 <= r["aggregate"]["moved"] <= 1 and r["aggregate"]["tokens"] > 0


def test_one_decoding_loop_gives_the_figures_of_the_passes_one_by_one(tiny_model):
    """probe's joint_passes (every pass in one loop, chunks of records, finished rows dropped) against
    evaluate, sample and aggregate_stats run one after another: the same pass@1 and leak, the same
    attempts (tokens counted), the same movement to float rounding, the same page, for the rule
    read with and without the counterfactual teacher and both gates."""
    import handrail.commands.probe as P

    for over in (dict(), dict(counterfactual="shuffled", gate="point"), dict(counterfactual="none", rule="none")):
        cfg = TrainConfig(model=tiny_model, max_new_tokens=20, **over)
        old_chunk, P.CHUNK = P.CHUNK, 7  # 20 records: three chunks, the last a short one
        try:
            joint = probe(cfg, n=20, html_attempts=3, log=lambda *_: None)
        finally:
            P.CHUNK = old_chunk
        apart = probe(cfg, n=20, html_attempts=3, log=lambda *_: None, separate=True)
        for key in ("student", "teacher", "shuffled", "answer_only"):
            assert joint[key] == apart[key], (over, key)
        a, b = joint["aggregate"], apart["aggregate"]
        assert a["tokens"] == b["tokens"] > 0 and a["counterfactual"] == b["counterfactual"]
        for k in ("raw_kl", "kl", "moved", "gated", "gated_share_of_movement"):
            assert abs(a[k] - b[k]) <= 1e-4 * max(1.0, abs(b[k])), (over, k, a[k], b[k])
        assert [len(x["tokens"]) for x in joint["attempts"]] == [len(x["tokens"]) for x in apart["attempts"]]
        assert [[t["text"] for t in x["tokens"]] for x in joint["attempts"]] == \
               [[t["text"] for t in x["tokens"]] for x in apart["attempts"]]
        assert joint["verdict"] == apart["verdict"]


def test_probe_command_prints_a_verdict_and_writes_json_and_a_page(tiny_model, tmp_path):
    page = tmp_path / "probe.html"
    p = subprocess.run([sys.executable, "-m", "handrail.cli", "probe", "--model", tiny_model, "--n", "6",
                        "--html", str(page), "--html-attempts", "2", "max_new_tokens=24"],
                       capture_output=True, text=True, env=ENV)
    assert p.returncode == 0, p.stderr
    assert "verdict: " in p.stdout and "teacher + another record's reference" in p.stdout
    assert "after a student's slip" in p.stdout  # an embedded task: the slip probe runs too
    text = page.read_text()
    assert text.count('class="tok') > 0 and "hover a token" in text and "http" not in text.split("<body>")[1]
    p = subprocess.run([sys.executable, "-m", "handrail.cli", "probe", "--model", tiny_model, "--n", "4", "--json",
                        "max_new_tokens=16", "rule=none", "gate=none"], capture_output=True, text=True, env=ENV)
    report = json.loads(p.stdout)
    assert report["aggregate"]["rule"] == "none" and report["aggregate"]["gated"] == 0.0
    assert {"student", "teacher", "shuffled", "answer_only", "verdict", "reason", "slip"} <= set(report)
    # bad input: one line, exit 2, before any work
    p = subprocess.run([sys.executable, "-m", "handrail.cli", "probe", "--model", tiny_model, "--html",
                        str(tmp_path / "no" / "such" / "x.html")], capture_output=True, text=True, env=ENV)
    assert p.returncode == 2 and "--html" in p.stderr and len(p.stderr.strip().splitlines()) == 1


def _browser():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("no Chromium and ChromeDriver here (Debian: apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1200,900"):
        opts.add_argument(flag)
    from selenium.webdriver.chrome.service import Service

    return webdriver.Chrome(service=Service(driver), options=opts)


def test_the_page_renders_in_a_headless_browser_and_hovering_shows_the_three_distributions(tiny_model, tmp_path):
    from handrail.commands.probe_html import write

    browser = _browser()
    try:
        report = probe(TrainConfig(model=tiny_model, max_new_tokens=24), n=4, html_attempts=2, log=lambda *_: None)
        page = tmp_path / "probe.html"
        write(report, page)
        browser.get(page.as_uri())
        from selenium.webdriver.common.action_chains import ActionChains
        from selenium.webdriver.common.by import By

        tokens = browser.find_elements(By.CSS_SELECTOR, ".tok")
        assert len(tokens) == sum(len(a["tokens"]) for a in report["attempts"]) > 0
        assert all(t.is_displayed() for t in tokens[:5])
        browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", tokens[1])  # clear of the panel
        ActionChains(browser).move_to_element(tokens[1]).perform()
        panel = browser.find_element(By.ID, "panel")
        assert panel.get_attribute("data-shown") == "0:1"
        first = report["attempts"][0]["tokens"][1]
        for name in ("student", "teacher", "target"):
            assert name in panel.text
            assert json.dumps(first[name][0][0]) in panel.text  # its most likely next token, as the page shows it
        shot = Path(os.environ.get("HANDRAIL_SCREENSHOT", tmp_path / "probe.png"))
        assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 1000
    finally:
        browser.quit()
