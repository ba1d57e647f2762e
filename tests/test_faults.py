"""Faults and bad input across the CLIs (issue 15): each case is a clear error naming the file,
line, column or flag, or a counted skip; never a traceback, never silently wrong output or lost
work."""
import json
import socket
import threading

import pytest

import common
import rationalrewards as rr
import rl_nft
from conftest import run_cli, solid


def raw_server(reply: bytes):
    """A TCP server on 127.0.0.1 answering every connection with `reply` and closing it."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)

    def serve():
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            data = b""
            # read the whole request before answering, so that closing does not reset a socket
            # still being written
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            head, _, body = data.partition(b"\r\n\r\n")
            lengths = [l.split(b":")[1] for l in head.split(b"\r\n")
                       if l.lower().startswith(b"content-length")]
            length = int(next(iter(lengths), b"0"))
            while len(body) < length:
                body += conn.recv(65536)
            conn.sendall(reply)
            conn.shutdown(socket.SHUT_WR)
            conn.close()
    threading.Thread(target=serve, daemon=True).start()
    return srv, f"http://127.0.0.1:{srv.getsockname()[1]}/v1"


@pytest.mark.parametrize("reply,what", [
    (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 500\r\n\r\n"
     b"{\"choices\"", "IncompleteRead"),
    (b"this is not http\r\n\r\n", "BadStatusLine"),
])
def test_broken_http_responses_are_one_backend_error(reply, what):
    srv, url = raw_server(reply)
    try:
        backend = common.OpenAIBackend(url, "m", timeout=5, max_retries=1)
        [out] = backend.generate([[{"role": "user", "content": "hi"}]])
        assert out.text == "" and out.error.startswith(f"chat-completions request to {url} failed")
    finally:
        srv.close()


def test_out_that_is_a_file_is_refused_by_every_cli(tmp_path):
    f = tmp_path / "taken"
    f.write_text("x")
    gcr = ["gcr_loop.py", "--generator", "tiny-random", "--scorer", "tiny-random",
           "--prompt", "a cat"]
    evaluation = ["rationalrewards.py", "eval", "--scorer", "tiny-random", "--pairs",
                  tmp_path / "pairs.jsonl"]
    for argv in (gcr, evaluation):
        res = run_cli(*argv, "--out", f)
        assert res.returncode == 2
        assert "is a file, not a directory" in res.stderr
        assert "Traceback" not in res.stderr


def test_disk_full_is_one_line_that_says_the_run_continues(capsys):
    def main():
        raise OSError(28, "No space left on device", "runs/x/checkpoint.pt.tmp")
    with pytest.raises(SystemExit) as exit_:
        common.run(main, rerun="run the same command with --resume")
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert "No space left on device (runs/x/checkpoint.pt.tmp)" in err
    assert "run the same command with --resume to continue" in err


def test_a_corrupt_line_in_the_middle_of_a_jsonl_is_named(tmp_path):
    f = tmp_path / "gcr.jsonl"
    f.write_text('{"id": "a"}\n{"id": "b"\n{"id": "c"}\n')
    with pytest.raises(ValueError, match=r"gcr.jsonl:2 is not a JSON record"):
        common.read_jsonl(f)
    # a torn LAST line is a killed write: cut off, as before
    f.write_text('{"id": "a"}\n{"id": "b"')
    assert common.read_jsonl(f) == [{"id": "a"}]


def test_benchmark_without_its_label_column_and_with_repeated_ids(tmp_path, capsys):
    from test_benchmarks import png, write_parquet
    path = write_parquet(tmp_path / "g" / "test.parquet", {
        "prompt": ["a", "b"], "left_image": [png("red"), png("blue")],
        "right_image": [png("blue"), png("red")]}, image_columns=("left_image", "right_image"))
    expected = "no column\\(s\\) vote_type; columns found: left_image, prompt, right_image"
    with pytest.raises(ValueError, match=expected):
        rr.benchmark_pairs("genai-bench-t2i", str(path.parent), None, tmp_path / "img")
    write_parquet(tmp_path / "m" / "pairs.parquet", {
        "pair_id": ["p", "p"], "prompt_text": ["a red kite", "a blue kite"],
        "response_a_images": [[png("red")], [png("blue")]],
        "response_b_images": [[png("blue")], [png("red")]],
        "chosen": ["A", "B"]}, list_image_columns=("response_a_images", "response_b_images"))
    pairs, _ = rr.benchmark_pairs("mmrb2-t2i", str(tmp_path / "m"), None, tmp_path / "img")
    assert [p["id"] for p in pairs] == ["p", "p@1"]
    assert "repeats an earlier row" in capsys.readouterr().err
    # each row is judged on its own images, not on the first row's cached ones
    assert [common.load_image(p["image_a"]).getpixel((0, 0)) for p in pairs] == [(255, 0, 0),
                                                                             (0, 0, 255)]


def test_damaged_checkpoints_and_changed_prompts_are_named_on_resume(tmp_path, scripted_server):
    from test_rl_nft import brightness_judge, nft_main
    server = scripted_server(brightness_judge)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red square\na blue circle\n")
    out = tmp_path / "run"
    assert nft_main(server, out, "--epochs", "1", "--prompts", prompts) == 0
    ckpt = out / "checkpoint.pt"
    whole = ckpt.read_bytes()
    ckpt.write_bytes(whole[:len(whole) // 2])
    with pytest.raises(ValueError, match="checkpoint.pt is damaged"):
        nft_main(server, out, "--epochs", "2", "--resume", "--prompts", prompts)
    ckpt.write_bytes(whole)
    # the prompts file's content changed though its path did not
    prompts.write_text("a green triangle\n")
    with pytest.raises(ValueError, match=r"content of the file\(s\) behind --prompts changed"):
        nft_main(server, out, "--epochs", "2", "--resume", "--prompts", prompts)


def test_eval_metrics_cover_exactly_the_selected_pairs(tmp_path):
    """A rerun into the same --out with a smaller --limit reports on those pairs, not on every old
    record."""
    from test_newcomer import Echo
    for c in ("red", "blue"):
        solid(c).save(tmp_path / f"{c}.png")
    pairs = [{
        "id": f"p{i}", "prompt": "x", "image_a": str(tmp_path / "red.png"),
        "image_b": str(tmp_path / "blue.png"), "label": "A" if i < 2 else "B"
    } for i in range(4)]
    scorer = rr.RationalRewardsScorer(Echo(), "t2i")  # equal scores: every pair predicted a tie
    m = rr.evaluate_preferences(scorer, pairs, "pairwise", str(tmp_path / "e"))
    assert m["pairs"] == 4
    m = rr.evaluate_preferences(scorer, pairs[:1], "pairwise", str(tmp_path / "e"))
    assert m["pairs"] == 1 and m["ab_labelled"] == 1


def test_gcr_decoding_settings_bind_the_run(tmp_path):
    out = tmp_path / "gcr"
    base = ["gcr_loop.py", "--generator", "tiny-random", "--scorer", "tiny-random", "--prompt",
            "a cat", "--out", out]
    assert run_cli(*base).returncode == 0
    res = run_cli(*base, "--scorer-max-new-tokens", "16")
    assert res.returncode == 2
    assert "--scorer-max-new-tokens" in res.stderr
    assert "Use another --out" in res.stderr


def test_resume_with_another_lora_rank_and_no_args_json_names_the_shapes(tmp_path, scripted_server):
    from test_rl_nft import brightness_judge, nft_main
    server = scripted_server(brightness_judge)
    out = tmp_path / "run"
    assert nft_main(server, out, "--epochs", "1", "--lora-r", "4") == 0
    (out / "args.json").unlink()                     # nothing left to compare the settings with
    with pytest.raises(ValueError, match="another --lora-r"):
        nft_main(server, out, "--epochs", "2", "--resume", "--lora-r", "8")


# ---- issue 22: concurrent runs, Ctrl-C, messages ----
def hold_lock(folder):
    """Another process holding the run folder, as a run started earlier would."""
    import subprocess
    import sys
    code = ("import fcntl, pathlib, sys, time; d = pathlib.Path(sys.argv[1]); d.mkdir(); "
            "f = open(d / '.lock', 'w'); fcntl.flock(f, fcntl.LOCK_EX); "
            "print('locked', flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder)], cwd=common.HERE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


@pytest.mark.parametrize("argv", [
    ["rationalrewards.py", "eval", "--scorer", "tiny-random", "--pairs", "PAIRS"],
    ["rl_nft.py", "--generator", "tiny-random", "--scorer", "tiny-random"],
    ["parrot.py", "--dataset", "demo", "--teacher", "tiny-random", "--student", "tiny-random"],
    ["gcr_loop.py", "--prompt", "x", "--generator", "tiny-random", "--scorer", "tiny-random"],
])
def test_a_second_run_into_a_folder_in_use_stops_at_once(tmp_path, argv):
    solid("red").save(tmp_path / "red.png")
    (tmp_path / "pairs.jsonl").write_text(json.dumps(
        {"prompt": "x", "image_a": "red.png", "image_b": "red.png", "label": "A"}) + "\n")
    argv = [str(tmp_path / "pairs.jsonl") if a == "PAIRS" else a for a in argv]
    out = tmp_path / "run"
    holder = hold_lock(out)
    try:
        res = run_cli(*argv, "--out", out)
    finally:
        holder.kill()
    assert res.returncode == 2, res.stderr[-2000:]
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert lines == [f"error: {out} is in use by another run (the same command started twice?): "
                     "wait for it to end, or use another --out"]
    assert not (out / "args.json").exists()


def test_ctrl_c_is_one_line_exit_130_and_the_rerun_completes(tmp_path, scripted_server):
    import signal
    import subprocess
    import sys
    import time
    for c in ("red", "blue"):
        solid(c).save(tmp_path / f"{c}.png")
    pairs = [{"id": f"p{i}", "prompt": f"p{i}", "image_a": "red.png", "image_b": "blue.png",
              "label": "A"} for i in range(4)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    reply = "1. Text Faithfulness:\n## Score: 3\n2. Physical and Visual Quality:\n## Score: 3\n"
    answered = []

    def first_then_hang(payload):
        answered.append(1)
        return reply if len(answered) <= 2 else ("hang", 20)  # pair p0's two critiques
    server = scripted_server(first_then_hang)
    out = tmp_path / "run"
    argv = [sys.executable, "rationalrewards.py", "eval", "--scorer", "served", "--scorer-api-base",
            server.url, "--pairs", str(tmp_path / "pairs.jsonl"), "--out", str(out),
            "--scorer-batch-size", "1"]
    proc = subprocess.Popen(argv, cwd=common.HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 1800  # generous: a busy machine must not trip it
    while len(common.read_jsonl(out / "predictions.jsonl")) < 1 or len(answered) < 3:
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=1800)
    assert proc.returncode == 130
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert err.strip().splitlines()[-1] == "interrupted; run the same command again to continue"
    # nothing half-written: one whole record, and the rerun adds the other three exactly once
    assert [r["id"] for r in common.read_jsonl(out / "predictions.jsonl")] == ["p0"]
    server.handler = lambda payload: reply
    res = run_cli(*argv[1:])
    assert res.returncode == 0, res.stderr[-2000:]
    assert sorted(r["id"] for r in common.read_jsonl(out / "predictions.jsonl")) == \
        ["p0", "p1", "p2", "p3"]


def test_ctrl_c_in_rl_says_resume(tmp_path):
    import signal
    import subprocess
    import sys
    import time
    out = tmp_path / "rl"
    proc = subprocess.Popen(
        [sys.executable, "rl_nft.py", "--generator", "tiny-random", "--scorer", "tiny-random",
         "--out", str(out), "--epochs", "50"], cwd=common.HERE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 1800  # generous: a busy machine must not trip it
    while not (out / "args.json").exists():
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=1800)
    assert proc.returncode == 130 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == \
        "interrupted; run the same command with --resume to continue"


def test_messages_name_the_real_problem(tmp_path):
    # a folder given as an image is a folder, not "missing"
    (tmp_path / "pics").mkdir()
    assert common.read_image(tmp_path / "pics") == (None, "a folder, not an image file")
    # an edit source_image of the wrong type says it must be a path
    solid("red").save(tmp_path / "house.png")
    (tmp_path / "edits.jsonl").write_text(
        json.dumps({"prompt": "make it blue", "source_image": ["house.png"]}) + "\n")
    with pytest.raises(ValueError, match=r"'source_image' must be a path \(a string\), got "
                                         r"\['house.png'\]"):
        rl_nft.read_items(str(tmp_path / "edits.jsonl"), "edit", 64)


# ---- issue 33.1-2: a server that stalls, or answers with something that is not JSON ----
def test_a_stalled_server_is_said_retried_and_failed_but_a_slow_one_is_waited_for(
        scripted_server, capsys):
    msgs = [[{"role": "user", "content": "hi"}]]
    for reply in (("stall", "## Justification: the", 30), ("hang", 30)):
        server = scripted_server(lambda p, reply=reply: reply)
        [out] = common.OpenAIBackend(server.url, "m", timeout=0.5, max_retries=1).generate(msgs)
        assert out.text == "" and "nothing received for 0.5 s (stalled?)" in out.error
        assert server.url in out.error and len(server.requests) == 2
        assert capsys.readouterr().err.count(f"warning: {server.url}") == 1  # the retry, said
    # a reply that keeps coming, a character every 0.3 s, takes as long as it needs
    server = scripted_server(lambda p: ("drip", "abcdefgh", 0.3))
    [out] = common.OpenAIBackend(server.url, "m", timeout=1.5, max_retries=0).generate(msgs)
    assert out.error is None and out.text == "abcdefgh" and len(server.requests) == 1


CUT_JSON = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 37\r\n\r\n"
            b'{"choices": [{"message": {"content": "')


def test_a_reply_that_is_not_json_is_a_failed_request_everywhere(tmp_path, scripted_server):
    server = scripted_server(lambda p: ("raw", CUT_JSON))
    (tmp_path / "a.png").write_bytes(b"")
    solid("red").save(tmp_path / "a.png")
    solid("blue").save(tmp_path / "b.png")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "red", "image_a": "a.png", "image_b": "b.png",
                                 "label": "A"}) + "\n")
    res = run_cli("rationalrewards.py", "eval", "--scorer", "m", "--scorer-api-base", server.url,
                  "--pairs", pairs, "--out", tmp_path / "eval")
    # counted and retried like a 500; no prediction could be made, so the exit is not 0 (33.8)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert f"{server.url} failed: the reply is not JSON" in res.stderr
    assert "no prediction could be made" in res.stderr
    [rec] = common.read_jsonl(tmp_path / "eval" / "predictions.jsonl")
    assert rec["failed"] and len(server.requests) == 2 * 3  # 2 critiques: a try, 2 retries each
    res = run_cli("gcr_loop.py", "--generator", "tiny-random", "--scorer", "m", "--scorer-api-base",
                  server.url, "--prompt", "a red door", "--out", tmp_path / "gcr")
    assert res.returncode == 2 and "the reply is not JSON" in res.stderr
    assert res.stderr.count("error:") == 1 and "Traceback" not in res.stderr


@pytest.mark.parametrize("script,library", [("rl_nft", "numpy"), ("rationalrewards", "tyro"),
                                            ("parrot", "PIL"), ("gcr_loop", "tqdm")])
def test_ctrl_c_while_the_libraries_import_is_one_line_and_exit_130(script, library):
    # issue 33.5: Ctrl-C in the first seconds, before `common.run`, was a KeyboardInterrupt
    # traceback (rc -2). The signal is sent when the module asks for its first big library.
    import subprocess
    import sys
    code = ("import builtins, os, signal, sys\n"
            f"sys.argv = ['{script}.py']\n"
            "real = builtins.__import__\n"
            "def spy(name, *a, **k):\n"
            f"    if name == '{library}':\n"
            "        os.kill(os.getpid(), signal.SIGINT)\n"
            "    return real(name, *a, **k)\n"
            "builtins.__import__ = spy\n"
            f"import {script}\n"
            "print('not interrupted')\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=common.HERE, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 130 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.strip().splitlines() == [
        "interrupted while starting; nothing was written: run the same command again"]


def test_disk_full_in_a_library_save_is_the_same_one_line(tmp_path, monkeypatch):
    # issue 33.6: torch.save and safetensors raise RuntimeError / SafetensorError, not OSError
    import torch
    saves = []
    real_save = torch.save

    def full_disk(obj, path, *a, **k):
        saves.append(path)
        if len(saves) > 1:  # the second checkpoint finds the disk full
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
        return real_save(obj, path, *a, **k)
    monkeypatch.setattr(torch, "save", full_disk)
    res = run_cli("rl_nft.py", "--generator", "tiny-random", "--scorer", "toy-redness",
                  "--epochs", "2", "--sample-steps", "2", "--eval-steps", "2",
                  "--out", tmp_path / "rl")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    [line] = [l for l in res.stderr.splitlines() if l.startswith("error:")]
    assert "could not write (RuntimeError: [enforce fail" in line and "checkpoint.pt.tmp" in line
    assert "Everything written before this is kept" in line and "--resume" in line
    assert torch.load(tmp_path / "rl" / "checkpoint.pt")["state"]["epoch"] == 1  # the first, whole
    from safetensors import SafetensorError

    def save_student():
        with common.saving(tmp_path / "student"):
            raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: "
                                  "StorageFull, message: \"No space left on device\" })")
    with pytest.raises(SystemExit):
        common.run(save_student)


def test_toy_critic_as_teacher_and_rank_errors_are_said_once(tmp_path, capsys, monkeypatch):
    # issue 33.8: `--teacher toy-redness` suggested `hf download toy-redness`
    res = run_cli("parrot.py", "--teacher", "toy-redness", "--out", tmp_path / "p")
    assert res.returncode == 2 and "cannot be PARROT's teacher" in res.stderr
    assert "hf download" not in res.stderr
    # under torchrun, ranks > 0 no longer repeat rank 0's error line about the same bad input
    monkeypatch.setattr(common, "RANK", 1)

    def bad():
        raise ValueError("--phases must be 3")
    with pytest.raises(SystemExit):
        common.run(bad)
    assert "error" not in capsys.readouterr().err


@pytest.mark.parametrize("kept", [2, 3])  # killed after a whole batch, or inside the second one
def test_a_killed_phase1_with_a_sampling_teacher_resumes_to_the_uninterrupted_run(tmp_path, kept):
    """tiny-random samples (temperature 0.7): each fixed batch of Phase 1 is seeded from --seed
    and its place, so a resumed run writes exactly what an uninterrupted one wrote (33.8)."""
    def phase1(out):
        res = run_cli("parrot.py", "--dataset", "demo", "--limit", "3", "--num-candidates", "2",
                      "--batch-size", "2", "--teacher", "tiny-random", "--student", "tiny-random",
                      "--max-new-tokens", "12", "--phases", "1", "--out", out)
        assert res.returncode == 0, res.stderr[-2000:]
        lines = (out / "phase1.jsonl").read_text().splitlines()
        return lines, [(r["id"], r["candidate"], r["rationale"]) for r in map(json.loads, lines)]
    _, whole = phase1(tmp_path / "whole")
    assert len(whole) == 6 and len({z for _, _, z in whole}) > 1
    first, _ = phase1(tmp_path / "killed")
    (tmp_path / "killed" / "phase1.jsonl").write_text("\n".join(first[:kept]) + "\n")  # the kill
    assert phase1(tmp_path / "killed")[1] == whole  # the folders differ, so the image paths do
