"""rationalrewards.py through its own command line, in subprocesses (CleanRL-style)."""
import json

import pytest

import common
import rationalrewards as rr

from conftest import dominant_colour, images_in, run_cli, text_in

SCORE_4 = """1. Text Faithfulness:
## Justification: Exactly as asked.
## Score: 4
2. Physical and Visual Quality:
## Justification: Clean.
## Score: 3.5
3. Text Rendering:
## Justification: No text requested.
## Score: N/A
# Summary: Good.
# User Request Refinement:
## Refinement Comments: None needed.
## Refined Request: {request}
"""
SCORE_1 = SCORE_4.replace("## Score: 4", "## Score: 1").replace("## Score: 3.5", "## Score: 2")


def test_score_json_reports_scores_reward_and_critique_per_image(image_dir):
    res = run_cli("rationalrewards.py", "score", "--scorer", "tiny-random", "--prompt",
                  "a red bicycle", "--image", image_dir / "red.png", "--scorer-max-new-tokens", "24",
                  "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert set(out) >= {"image", "scores", "reward", "refined_request", "critique", "summary"}
    assert set(out["scores"]) == {"text_faithfulness", "physical_quality", "text_rendering"}
    # tiny-random text is noise: check the plumbing, i.e. the report is what its own critique says
    assert out["scores"] == rr.parse_pointwise(out["critique"], "t2i").scores
    assert out["reward"] == pytest.approx(rr.reward_from_scores(out["scores"]))


def test_score_edit_tiny_random_two_images(image_dir):
    res = run_cli("rationalrewards.py", "score", "--scorer", "tiny-random", "--task", "edit",
                  "--prompt", "make it blue", "--image", image_dir / "blue.png",
                  "--image", image_dir / "green.png", "--source-image", image_dir / "red.png",
                  "--scorer-max-new-tokens", "16", "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert [o["image"] for o in out] == [str(image_dir / "blue.png"), str(image_dir / "green.png")]
    edit_dims = {"text_faithfulness", "image_faithfulness", "physical_quality", "text_rendering"}
    assert all(set(o["scores"]) == edit_dims for o in out)


def test_score_through_http_backend_reports_exact_numbers(image_dir, scripted_server):
    server = scripted_server(lambda p: SCORE_4.format(request="a red bicycle, sharp focus"))
    res = run_cli("rationalrewards.py", "score", "--scorer", "served", "--scorer-api-base", server.url,
                  "--prompt", "a red bicycle", "--image", image_dir / "red.png")
    assert res.returncode == 0, res.stderr
    # readable report: per-dimension scores, the reward (mean(4, 3.5) - 1) / 3 = 0.917,
    # the refined request
    assert "Physical and Visual Quality  3.50" in res.stdout
    assert "reward (0-1)                 0.917" in res.stdout
    assert "a red bicycle, sharp focus" in res.stdout


def test_bad_inputs_are_clear_errors(image_dir):
    res = run_cli("rationalrewards.py", "score", "--scorer", "tiny-random", "--prompt", "x",
                  "--image", image_dir / "bad.png")
    assert res.returncode != 0
    assert "cannot read image" in res.stderr
    assert "Traceback" not in res.stderr
    res = run_cli("rationalrewards.py", "score", "--scorer", "tiny-random", "--task", "edit",
                  "--prompt", "x", "--image", image_dir / "red.png")
    assert res.returncode != 0 and "--source-image" in res.stderr
    res = run_cli("rationalrewards.py", "score", "--scorer", "someone/not-downloaded", "--prompt",
                  "x", "--image", image_dir / "red.png")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "Could not load model 'someone/not-downloaded'" in res.stderr
    assert "hf download" in res.stderr
    res = run_cli("rationalrewards.py", "score", "--scorer", image_dir / "no-such-model", "--prompt",
                  "x", "--image", image_dir / "red.png")
    assert res.returncode == 2
    assert "does not exist" in res.stderr
    assert "hf download" not in res.stderr
    (image_dir / "p.jsonl").write_text(json.dumps({"prompt": "p", "image_a": "red.png",
                                                   "image_b": "blue.png", "label": "A"}) + "\n")
    for limit in ("0", "-1"):  # issue 7.11: eval --limit 0 used to evaluate one pair
        res = run_cli("rationalrewards.py", "eval", "--scorer", "tiny-random", "--pairs",
                      image_dir / "p.jsonl", "--limit", limit)
        assert res.returncode != 0 and "--limit must be a positive number" in res.stderr


def write_pairs(image_dir, rows):
    path = image_dir / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def colour_judge(payload):
    """A scripted scorer that likes red and dislikes everything else (pointwise) or prefers the red
    image (pairwise)."""
    colours = [dominant_colour(u) for u in images_in(payload)]
    if "## Score A:" in text_in(payload):
        a, b = colours
        sa, sb = (4, 1) if a == "red" else (1, 4) if b == "red" else (2, 2)
        return (f"1. Text Faithfulness:\n## Score A: {sa}\n## Score B: {sb}\n"
                "2. Physical and Visual Quality:\n## Score A: 3\n## Score B: 3\n"
                "3. Text Rendering:\n## Score A: N/A\n## Score B: N/A")
    if colours[0] == "green":
        return "I refuse."  # unreadable
    return (SCORE_4 if colours[0] == "red" else SCORE_1).format(request="r")


@pytest.mark.parametrize("mode", ["pointwise", "pairwise"])
def test_eval_accuracy_is_exact_with_scripted_judge(image_dir, scripted_server, mode, tmp_path):
    rows = [
        {"prompt": "p1", "image_a": "red.png", "image_b": "blue.png", "label": "A"},   # correct
        {"prompt": "p2", "image_a": "blue.png", "image_b": "red.png", "label": "B"},   # correct
        {"prompt": "p3", "image_a": "red.png", "image_b": "blue.png", "label": "B"},   # wrong
        # tie predicted: correct
        {"prompt": "p4", "image_a": "blue.png", "image_b": "blue.png", "label": "tie"},
        # pointwise: unreadable
        {"prompt": "p5", "image_a": "green.png", "image_b": "red.png", "label": "B"},
        # corrupt: skipped
        {"prompt": "p6", "image_a": "bad.png", "image_b": "red.png", "label": "A"},
        # missing: skipped
        {"prompt": "p7", "image_a": "missing.png", "image_b": "red.png", "label": "A"},
    ]
    server = scripted_server(colour_judge)
    out = tmp_path / "eval"
    res = run_cli("rationalrewards.py", "eval", "--scorer", "served", "--scorer-api-base", server.url,
                  "--mode", mode, "--pairs", write_pairs(image_dir, rows), "--out", out,
                  "--scorer-batch-size", "3")
    assert res.returncode == 0, res.stderr
    m = json.loads((out / "metrics.json").read_text())
    assert m["pairs"] == 5 and m["skipped_pairs"] == 2
    assert m["skipped_missing_image"] == 1 and m["skipped_unreadable_image"] == 1
    assert "missing.png: missing" in res.stderr and "bad.png: corrupt or not an image" in res.stderr
    if mode == "pointwise":
        # p5: green is unreadable -> counted, and each of its dimensions counts 2.5 (issue 7.4):
        # A = 7.5 < B (red) = 4 + 3.5 + 2.5 = 10 -> B, correct. 4 of 5 correct; without ties 3 of 4
        assert m["unreadable_outputs"] == 1
        assert m["accuracy_with_ties"] == pytest.approx(4 / 5)
        assert m["accuracy_without_ties"] == pytest.approx(3 / 4)
        assert next(r for r in map(json.loads, (out / "predictions.jsonl").read_text().splitlines())
                    if r["label"] == "B" and r["unreadable"])["predicted"] == "B"
        # red scores 4 / 3.5; blue scores 1 / 2.
        # Readable images: p1 r,b p2 b,r p3 r,b p4 b,b p5 r -> 4 red, 5 blue
        assert m["mean_scores"]["text_faithfulness"] == pytest.approx((4 * 4 + 5 * 1) / 9)
    else:
        # p5: red is B -> correct; 4 of 5 correct; without ties 3 of 4
        assert m["unreadable_outputs"] == 0
        assert m["accuracy_with_ties"] == pytest.approx(4 / 5)
        assert m["accuracy_without_ties"] == pytest.approx(3 / 4)
    # the metrics and the progress bar
    assert "accuracy_with_ties" in res.stdout and "eval (" in res.stderr
    assert json.loads((out / "args.json").read_text())["mode"] == mode
    # a rerun resumes: nothing is asked again, nothing duplicated
    n_requests = len(server.requests)
    res = run_cli("rationalrewards.py", "eval", "--scorer", "served", "--scorer-api-base", server.url,
                  "--mode", mode, "--pairs", image_dir / "pairs.jsonl", "--out", out)
    assert res.returncode == 0, res.stderr
    assert len(server.requests) == n_requests
    ids = [json.loads(l)["id"] for l in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(ids) == len(set(ids)) == 5
    # issue 7.7: the same pairs file named by its absolute path resumes too
    res = run_cli("rationalrewards.py", "eval", "--scorer", "served", "--scorer-api-base", server.url,
                  "--mode", mode, "--pairs", (image_dir / "pairs.jsonl").resolve(), "--out", out)
    assert res.returncode == 0, res.stderr
    assert len(server.requests) == n_requests
    # issue 7.8: other settings into the same --out are refused, naming the difference
    other = "pairwise" if mode == "pointwise" else "pointwise"
    res = run_cli("rationalrewards.py", "eval", "--scorer", "served", "--scorer-api-base", server.url,
                  "--mode", other, "--pairs", image_dir / "pairs.jsonl", "--out", out)
    assert res.returncode == 2 and "--mode" in res.stderr and "other settings" in res.stderr
    assert "Traceback" not in res.stderr and len(server.requests) == n_requests


def test_eval_tiny_random_in_process_model(image_dir, tmp_path):
    rows = [{"prompt": f"p{i}", "image_a": "red.png", "image_b": "blue.png", "label": "A"}
            for i in range(3)]
    res = run_cli("rationalrewards.py", "eval", "--scorer", "tiny-random", "--pairs",
                  write_pairs(image_dir, rows), "--mode", "pairwise", "--scorer-max-new-tokens", "16",
                  "--out", tmp_path / "e", "--limit", "2")
    assert res.returncode == 0, res.stderr
    m = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert m["pairs"] == 2 and m["mode"] == "pairwise"


def test_eval_bad_pairs_file_is_clear(image_dir):
    path = image_dir / "broken.jsonl"
    path.write_text('{"prompt": "x", "image_a": "red.png"}\n')
    res = run_cli("rationalrewards.py", "eval", "--scorer", "tiny-random", "--pairs", path)
    assert res.returncode == 2 and "broken.jsonl:1" in res.stderr and "Traceback" not in res.stderr


def test_default_model_follows_the_task(image_dir):
    res = run_cli("rationalrewards.py", "score", "--task", "edit", "--prompt", "x", "--image",
                  image_dir / "red.png", "--source-image", image_dir / "blue.png")
    assert res.returncode == 2
    assert "Could not load model 'TIGER-Lab/RationalRewards-8B-Edit'" in res.stderr


def test_decompression_bomb_is_a_counted_skip_not_an_abort(image_dir, tmp_path, monkeypatch):
    # issue 7.12: PIL's bomb check (> ~179 MP) raised through the whole eval; the limit is lowered
    # here so that a small image trips the same check
    from PIL import Image
    Image.new("RGB", (300, 300), "red").save(image_dir / "huge.png")
    # > 2x the limit: an error, not a warning
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300 * 300 // 4)
    assert "too large to decode" in common.read_image(image_dir / "huge.png")[1]

    class Judge:  # pairwise, always prefers A
        batch_size = 8

        def generate(self, batch, *a, **k):
            return ["1. Text Faithfulness:\n## Score A: 4\n## Score B: 1"] * len(batch)
    pairs = [{"id": "bomb", "prompt": "p", "image_a": str(image_dir / "huge.png"),
              "image_b": str(image_dir / "red.png"),
              "label": "A"},
             {"id": "ok", "prompt": "p", "image_a": str(image_dir / "red.png"),
              "image_b": str(image_dir / "blue.png"), "label": "A"}]
    m = rr.evaluate_preferences(rr.RationalRewardsScorer(Judge(), "t2i"), pairs, "pairwise",
                                str(tmp_path / "e"))
    assert m["pairs"] == 1 and m["skipped_unreadable_image"] == 1 and m["accuracy_with_ties"] == 1.0


def test_stderr_holds_what_a_user_needs(image_dir):
    # issue 7.16: no bitsandbytes kernel warning, no library loading bars, no deprecation noise
    # a fresh Python: library warnings print once per process, and logging handlers keep the
    # stderr they were made with
    res = run_cli("rationalrewards.py", "score", "--scorer", "tiny-random", "--scorer-quantization", "4bit",
                  "--prompt", "x", "--image", image_dir / "red.png", "--scorer-max-new-tokens", "4",
                  fresh=True)
    assert res.returncode == 0, res.stderr[-2000:]
    lines = [l for l in res.stderr.splitlines() if l.strip()]
    # the resolved arguments go to args.json only; and no truncation warning for tiny-random,
    # whose noise always runs to the limit (issue 22, 3.6)
    assert lines == [], lines


# ---- --prompts-dir: another wording (e.g. the official one, verbatim) without editing prompts/ ----
OFFICIAL_LIKE = """[system]
A system turn of the user's own.
[user]
User Instruction: {request}
1. Generated Image <image>
Answer with the official headers, Score before Justification."""


def test_prompts_dir_replaces_a_template_and_every_command_checks_it(image_dir, scripted_server,
                                                                    tmp_path):
    folder = tmp_path / "official"
    folder.mkdir()
    (folder / "pointwise_t2i.txt").write_text(OFFICIAL_LIKE)
    server = scripted_server(lambda p: SCORE_4.format(request="r"))
    res = run_cli("rationalrewards.py", "score", "--scorer", "served", "--scorer-api-base", server.url,
                  "--prompt", "a red bicycle", "--image", image_dir / "red.png", "--json",
                  "--prompts-dir", folder)
    assert res.returncode == 0, res.stderr
    messages = server.requests[0]["payload"]["messages"]
    assert [m["role"] for m in messages] == ["system", "user"]
    assert messages[0]["content"] == "A system turn of the user's own."
    assert text_in(server.requests[0]["payload"]).startswith("User Instruction: a red bicycle")
    assert json.loads(res.stdout)["reward"] == pytest.approx((3.75 - 1) / 3)
    # a template that lacks a field the code fills: one error line naming file and field, before
    # any model loads, for --prompts-dir and the shipped folder alike (issue 33.7)
    (folder / "pointwise_t2i.txt").write_text(OFFICIAL_LIKE.replace("{request}", "the request"))
    for argv in (["rationalrewards.py", "score", "--scorer", "tiny-random", "--prompt", "x",
                  "--image", image_dir / "red.png"],
                 ["gcr_loop.py", "--generator", "tiny-random", "--scorer", "tiny-random",
                  "--prompt", "x", "--out", tmp_path / "gcr"],
                 ["rl_nft.py", "--generator", "tiny-random", "--scorer", "tiny-random", "--out",
                  tmp_path / "nft"],
                 ["parrot.py", "--teacher", "tiny-random", "--student", "tiny-random", "--out",
                  tmp_path / "parrot"]):
        res = run_cli(*argv, "--prompts-dir", folder)
        assert res.returncode == 2 and res.stderr.count("error:") == 1, (argv, res.stderr)
        assert "pointwise_t2i.txt lacks {request}" in res.stderr, res.stderr
    assert not (tmp_path / "gcr").exists() and not (tmp_path / "nft" / "checkpoint.pt").exists()
    # a file that replaces no template, and a folder that is not there
    (folder / "pointwise_t2i.txt").write_text(OFFICIAL_LIKE)
    (folder / "pointwise.txt").write_text(OFFICIAL_LIKE)
    res = run_cli("rationalrewards.py", "score", "--prompt", "x", "--image", image_dir / "red.png",
                  "--prompts-dir", folder)
    assert res.returncode == 2 and "pointwise.txt replace no template" in res.stderr
    res = run_cli("rationalrewards.py", "score", "--prompt", "x", "--image", image_dir / "red.png",
                  "--prompts-dir", tmp_path / "nowhere")
    assert res.returncode == 2 and "is not a folder" in res.stderr


def test_a_shipped_template_without_its_field_is_one_error(image_dir, tmp_path, monkeypatch):
    shipped = tmp_path / "prompts"
    shipped.mkdir()
    for p in rr.PROMPTS_DIR.glob("*.txt"):
        text = p.read_text()
        shipped.joinpath(p.name).write_text(text.replace("{request}", "x") if
                                            p.name == "pointwise_t2i.txt" else text)
    monkeypatch.setattr(rr, "PROMPTS_DIR", shipped)
    res = run_cli("rationalrewards.py", "score", "--scorer", "tiny-random", "--prompt", "x",
                  "--image", image_dir / "red.png")
    assert res.returncode == 2 and "pointwise_t2i.txt lacks {request}" in res.stderr
    monkeypatch.undo()
    rr.use_prompts_dir(None)  # forget the templates read from the copy
