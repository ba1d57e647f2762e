"""parrot.py through its command line: the smoke run, a scripted HTTP teacher end to end, SIGKILL
resume."""
import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import pytest

import common
import rationalrewards as rr
from conftest import ROOT, run_cli, text_in


def teacher_reply(payload):
    """A scripted teacher served over HTTP: consistent rationales that blame text faithfulness,
    consistency answers with logprobs that follow the rationale's scores, projections that copy
    their anchors."""
    text = text_in(payload)
    if payload.get("logprobs"):
        j = rr.parse_pairwise(text.split("### Judgement to Check")[1], "t2i")
        pa = 0.8 if j.preferred == "A" else 0.2
        top = [{"token": "A", "logprob": math.log(pa)}, {"token": "B", "logprob": math.log(1 - pa)}]
        first = {"token": j.preferred, "logprob": 0.0, "top_logprobs": top}
        return {"choices": [{"message": {"content": j.preferred},
                             "logprobs": {"content": [first]}}]}
    if "### Reference Scores" in text:
        titles = ("Text Faithfulness", "Physical and Visual Quality", "Text Rendering")
        anchors = dict(re.findall(rf"- ({'|'.join(titles)}): (\S+)", text))
        sections = "".join(f"{i}. {name}:\n## Justification: seen.\n## Score: {anchors[name]}\n"
                           for i, name in enumerate(titles, 1))
        return (sections + "# Summary: ok\n# User Request Refinement:\n"
                "## Refinement Comments: none\n## Refined Request: same")
    label = re.search(r"Human Preference: Image ([AB])", text).group(1)
    hi, lo = ("4", "2") if label == "A" else ("2", "4")
    return ("# User Request Analysis\nx\n# Detailed Judgement\n1. Text Faithfulness:\n"
            f"## Justification: one is off.\n## Score A: {hi}\n## Score B: {lo}\n"
            f"## Winner: Image {label}\n2. Physical and Visual Quality:\n"
            "## Justification: both clean.\n## Score A: 3\n## Score B: 3\n## Winner: It's a tie\n"
            "3. Text Rendering:\n## Justification: n/a\n## Score A: N/A\n## Score B: N/A\n"
            f"## Winner: N/A\n# Summary: {label} wins.")


def test_end_to_end_with_http_teacher_trains_a_loadable_student(tmp_path, scripted_server):
    server = scripted_server(teacher_reply)
    out = tmp_path / "run"
    http_teacher = ["--teacher", "served", "--teacher-api-base", server.url]
    flags = http_teacher + [
        "--dataset", "demo", "--limit", "12", "--student", "tiny-random", "--out", out,
        "--max-new-tokens", "16", "--epochs", "2", "--grad-accum", "2", "--eval-fraction", "0.25"
    ]
    res = run_cli("parrot.py", *flags, "--phases", "1")
    assert res.returncode == 0, res.stderr[-3000:]
    assert not (out / "phase2.jsonl").exists()
    res = run_cli("parrot.py", *flags, "--phases", "23")
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    phase2 = common.read_jsonl(out / "phase2.jsonl")
    assert report["kept"] == 12 and report["retention_rate"] == 1.0
    assert report["elbo_term1_all_candidates"] == pytest.approx(math.log(0.8))
    assert report["mean_log_p_y_given_xz_kept"] == pytest.approx(math.log(0.8))
    # the scripted teacher always separates the images on text faithfulness
    share = sum(r["defect_dimension"] == "text_faithfulness" for r in phase2) / 12
    assert report["attribution_accuracy"] == pytest.approx(share)
    sft, held = common.read_jsonl(out / "sft.jsonl"), common.read_jsonl(out / "heldout.jsonl")
    assert len(sft) + len(held) == 36  # one pairwise + two pointwise per kept pair
    assert report["phase3_projections"] == {"kept": 24, "dropped_score_stray": 0}
    assert report["sft_samples"] == {"train": len(sft), "heldout": len(held)}
    assert {s["kind"] for s in sft} == {"pairwise", "pointwise"}
    train_prompts = {r["prompt"] for r in phase2 if r["id"] in {s["id"] for s in sft}}
    held_prompts = {r["prompt"] for r in phase2 if r["id"] in {s["id"] for s in held}}
    assert held_prompts and not train_prompts & held_prompts
    for s in sft:  # LLaMA-Factory / TRL form, with no label anywhere in the input
        roles = (["system"] if s["kind"] == "pointwise" else []) + ["user", "assistant"]
        assert [m["role"] for m in s["messages"]] == roles  # the scorer's turns, as it is asked
        assert s["messages"][-2]["content"].count("<image>") == len(s["images"])
        assert "{preferred}" not in s["messages"][-2]["content"]
        assert not re.search(r"Human Preference|Image [AB] is preferred", s["messages"][-2]["content"])
    st = report["student"]
    assert st["sft_samples"] == len(sft) and len(st["train_losses"]) == 2 * math.ceil(len(sft) / 2)
    assert set(st["before"]["accuracy"]) == {"pointwise", "pairwise"}
    assert set(st["after"]["accuracy"]) == {"pointwise", "pairwise"}
    assert st["before"]["heldout_nll"] is not None and st["after"]["heldout_nll"] is not None
    assert (out / "student" / "adapter_config.json").is_file()
    # the student loads in rationalrewards.py as an adapter
    img = phase2[0]["image_a"]
    res = run_cli("rationalrewards.py", "score", "--scorer", "tiny-random", "--scorer-adapter",
                  out / "student", "--prompt", "a red circle", "--image", img, "--scorer-max-new-tokens",
                  "8", "--json")
    assert res.returncode == 0, res.stderr[-2000:]
    assert set(json.loads(res.stdout)["scores"]) == {"text_faithfulness", "physical_quality",
                                                     "text_rendering"}
    # the same command again redoes nothing: no teacher request, same report
    n = len(server.requests)
    res = run_cli("parrot.py", *flags)
    assert res.returncode == 0, res.stderr[-3000:]
    assert len(server.requests) == n
    # another teacher for the same folder is refused before anything loads (issue 33.3: its
    # rationales would be mixed with the first teacher's), naming the difference
    res = run_cli("parrot.py", *flags[len(http_teacher):], "--teacher", "nobody/not-a-model")
    assert res.returncode == 2 and "--teacher: 'served' then, 'nobody/not-a-model' now" in res.stderr
    assert "hf download" not in res.stderr and len(server.requests) == n
    assert json.loads((out / "report.json").read_text())["student"] == st


def test_sigkill_mid_phase1_then_rerun_matches_uninterrupted_run(tmp_path, scripted_server):
    def slow(payload):
        time.sleep(0.15)
        return teacher_reply(payload)
    server = scripted_server(slow)
    args = lambda out: [sys.executable, "parrot.py", "--dataset", "demo", "--limit", "10",
                        "--teacher", "served", "--teacher-api-base", server.url, "--out", str(out),
                        "--phases", "12", "--batch-size", "1"]
    env = {**os.environ}
    ref = subprocess.run(args(tmp_path / "ref"), cwd=ROOT, capture_output=True, text=True, env=env,
                         timeout=3600)
    assert ref.returncode == 0, ref.stderr[-2000:]
    proc = subprocess.Popen(args(tmp_path / "cut"), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env)
    phase1 = tmp_path / "cut" / "phase1.jsonl"
    deadline = time.time() + 120
    def written():
        return len(phase1.read_text().splitlines()) if phase1.is_file() else 0

    while time.time() < deadline and written() < 4:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = len(phase1.read_text().splitlines())
    assert 4 <= written < 10
    res = subprocess.run(args(tmp_path / "cut"), cwd=ROOT, capture_output=True, text=True, env=env,
                         timeout=3600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"phase 1: anchored generation: resumed, {written} of 10 already done" in res.stderr
    # a rerun with nothing left says so and shows no empty progress bar (issue 17.7)
    again = subprocess.run(args(tmp_path / "cut"), cwd=ROOT, capture_output=True, text=True,
                           env=env, timeout=3600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "phase 1: anchored generation: resumed, 10 of 10 already done" in again.stderr
    assert "phase 2: consistency: resumed, 10 of 10 already done" in again.stderr
    assert "0/0" not in again.stderr and "0pair" not in again.stderr
    for name in ("phase1.jsonl", "phase2.jsonl"):
        got = common.read_jsonl(tmp_path / "cut" / name)
        want = common.read_jsonl(tmp_path / "ref" / name)
        assert len(got) == len({r["id"] for r in got}) == 10
        key = lambda r: json.dumps(
            {k: v
             for k, v in r.items() if not k.startswith(("image", "source"))}, sort_keys=True)
        assert sorted(map(key, got)) == sorted(map(key, want))


def test_missing_data_or_earlier_phase_is_one_clear_error(tmp_path):
    res = run_cli("parrot.py", "--dataset", "hpdv3", "--data-dir", tmp_path / "nowhere", "--out",
                  tmp_path / "o", "--teacher", "tiny-random", "--student", "tiny-random")
    assert res.returncode == 2
    assert "hf download MizzenAI/HPDv3" in res.stderr
    assert "Traceback" not in res.stderr
    res = run_cli("parrot.py", "--phases", "2", "--out", tmp_path / "empty", "--teacher",
                  "tiny-random")
    assert res.returncode == 2 and "run --phases 1 first" in res.stderr
    res = run_cli("parrot.py", "--phases", "4", "--out", tmp_path / "o")
    assert res.returncode != 0 and "--phases" in res.stderr
    res = run_cli("parrot.py", "--dataset", "rapidata", "--out", tmp_path / "o", "--teacher",
                  "tiny-random", "--student", "tiny-random")
    assert res.returncode == 2 and "hf download" in res.stderr and "--hf-dataset" in res.stderr



def test_bad_arguments_fail_before_any_work(tmp_path):
    # issue 7.15: the student is checked at start, not after Phases 1 and 2 ran
    res = run_cli("parrot.py", "--dataset", "demo", "--limit", "2", "--teacher", "tiny-random",
                  "--student", "someone/not-downloaded", "--out", tmp_path / "o")
    assert res.returncode == 2
    assert "student 'someone/not-downloaded'" in res.stderr
    assert "hf download" in res.stderr
    assert not (tmp_path / "o" / "phase1.jsonl").exists()
    # issue 7.14: a path that does not exist says so, without hub advice
    res = run_cli("parrot.py", "--dataset", "demo", "--teacher", "tiny-random", "--student",
                  "./models/nope", "--out", tmp_path / "o")
    assert res.returncode == 2
    assert "does not exist" in res.stderr
    assert "hf download" not in res.stderr
    # issue 7.11: non-positive limits
    for flag, value in (("--limit", "0"), ("--limit", "-1"), ("--num-candidates", "0")):
        res = run_cli("parrot.py", "--dataset", "demo", flag, value, "--teacher", "tiny-random",
                      "--student", "tiny-random", "--out", tmp_path / "o")
        assert res.returncode != 0 and f"{flag} must be a positive number" in res.stderr, (
            flag, res.stderr[-500:])
    assert not (tmp_path / "o" / "phase1.jsonl").exists()
