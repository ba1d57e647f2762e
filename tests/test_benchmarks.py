"""Paper Table 1 benchmarks: loaders on tiny parquet files with each benchmark's real columns
(from its dataset card and evaluation code), labels and ties, multi-way groups, exact accuracy
with a scripted pairwise judge, the CLI, and a template with a system section."""
import io
import json

import pytest

import common
import rationalrewards as rr
from conftest import dominant_colour, images_in, run_cli, solid


def png(colour):
    buf = io.BytesIO()
    solid(colour).save(buf, format="PNG")
    return {"bytes": buf.getvalue(), "path": None}


def write_parquet(path, columns: dict, image_columns=(), list_image_columns=()):
    import pyarrow as pa
    import pyarrow.parquet as pq
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    arrays = {}
    for k, v in columns.items():
        if k in image_columns:
            arrays[k] = pa.array(v, image_type)
        elif k in list_image_columns:
            arrays[k] = pa.array(v, pa.list_(image_type))
        else:
            arrays[k] = pa.array(v)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(arrays), path)
    return path


def genai_t2i(root):
    # votes: left, right, tie, both bad (-> tie), and a corrupt image (skipped)
    return write_parquet(root / "genai-bench-t2i" / "test-00000-of-00001.parquet", {
        "prompt": ["a red cat", "a red dog", "two cats", "a boat", "broken"],
        "left_model": ["m1"] * 5, "right_model": ["m2"] * 5,
        "left_image": [png("red"), png("blue"), png("red"), png("blue"),
                       {"bytes": b"junk", "path": None}],
        "right_image": [png("blue"), png("red"), png("blue"), png("blue"), png("red")],
        "vote_type": ["leftvote", "rightvote", "tievote", "bothbad_vote", "leftvote"],
    }, image_columns=("left_image", "right_image"))


def genai_edit(root):
    return write_parquet(root / "genai-bench-edit" / "test-00000-of-00001.parquet", {
        "source_prompt": ["a house"] * 2, "target_prompt": ["a red house"] * 2,
        "instruct_prompt": ["make it red", "make it red too"], "source_image": [png("green")] * 2,
        "left_model": ["m1"] * 2, "left_output_image": [png("blue"), png("red")],
        "right_model": ["m2"] * 2, "right_output_image": [png("red"), png("blue")],
        "vote_type": ["rightvote", "rightvote"],
    }, image_columns=("source_image", "left_output_image", "right_output_image"))


def editreward(root):
    # a 2-way sample (g1) and a 3-way group (g2: candidates A red, B blue, C green)
    ids = ["g1", "g2_AvsB", "g2_AvsC", "g2_BvsC"]
    return write_parquet(root / "editreward-bench" / "train.parquet", {
        "id": ids, "instruction": ["make it red"] * 4, "source_image": [png("green")] * 4,
        "candidate_1": [png("red"), png("red"), png("red"), png("blue")],
        "candidate_2": [png("blue"), png("blue"), png("green"), png("green")],
        "ranking": ["A>B", "A>B", "C>A", "B=C"],
        "comparison_type": ["AvsB", "AvsB", "AvsC", "BvsC"],
        "dataset": ["2pair", "3pair", "3pair", "3pair"], "score_1": [6.0, 6.0, 4.0, 3.0],
        "score_2": [3.0, 3.0, 6.0, 3.0], "model_1": ["x"] * 4, "model_2": ["y"] * 4,
    }, image_columns=("source_image", "candidate_1", "candidate_2"))


def mmrb2(root, name):
    return write_parquet(root / name / "pairs.parquet", {
        "pair_id": ["p1", "p2"], "prompt_text": ["a red kite", "a red kite again"],
        "prompt_images": [[png("green")], [png("green"), png("red"), png("blue")]],
        "response_a_images": [[png("red")], [png("blue")]],
        "response_b_images": [[png("blue")], [png("red")]], "chosen": ["A", "B"],
        "response_a_model": ["x", "y"], "response_b_model": ["y", "x"],
    }, list_image_columns=("prompt_images", "response_a_images", "response_b_images"))


def test_labels_follow_each_benchmarks_protocol(tmp_path):
    genai_t2i(tmp_path), genai_edit(tmp_path), editreward(tmp_path), mmrb2(tmp_path, "mmrb2-edit")
    pairs, skipped = rr.benchmark_pairs("genai-bench-t2i", str(tmp_path / "genai-bench-t2i"), None,
                                        tmp_path / "img")
    # both-bad counts as a tie, as officially
    assert [p["label"] for p in pairs] == ["A", "B", "tie", "tie"]
    assert skipped == {"unlabelled": 0, "missing_image": 0, "unreadable_image": 1}
    assert common.load_image(pairs[0]["image_a"]).getpixel((0, 0)) == (255, 0, 0)  # left is A
    pairs, _ = rr.benchmark_pairs("genai-bench-edit", str(tmp_path / "genai-bench-edit"), None,
                                  tmp_path / "img")
    assert [p["label"] for p in pairs] == ["B", "B"] and pairs[0]["prompt"] == "make it red"
    assert common.load_image(pairs[0]["source_image"]).getpixel((0, 0)) == (0, 128, 0)
    pairs, _ = rr.benchmark_pairs("editreward-bench", str(tmp_path / "editreward-bench"), None,
                                  tmp_path / "img")
    # "C>A" in comparison AvsC: candidate_2 (C) wins -> B; "B=C" -> tie
    assert [(p["id"], p["label"]) for p in pairs] == [
        ("g1", "A"), ("g2_AvsB", "A"), ("g2_AvsC", "B"), ("g2_BvsC", "tie")]
    pairs, _ = rr.benchmark_pairs("mmrb2-edit", str(tmp_path / "mmrb2-edit"), None,
                                  tmp_path / "img")
    assert [(p["id"], p["label"]) for p in pairs] == [("p1", "A"), ("p2", "B")]
    assert [len(p["source_images"]) for p in pairs] == [1, 3]  # every prompt_images entry, in order
    colours = [common.load_image(f).getpixel((0, 0)) for f in pairs[1]["source_images"]]
    assert colours == [(0, 128, 0), (255, 0, 0), (0, 0, 255)]
    # --limit touches only what it needs
    pairs, _ = rr.benchmark_pairs("genai-bench-t2i", str(tmp_path / "genai-bench-t2i"), 1,
                                  tmp_path / "img")
    assert len(pairs) == 1


def test_editreward_labels_from_comparison_type_or_ranking():
    # comparison_type names the pair; the ranking may be pairwise or a full ranking
    # (the letter written first wins)
    assert rr.editreward_label("C>A", "AvsC") == "B" and rr.editreward_label("A>C", "AvsC") == "A"
    assert rr.editreward_label("C>A>B", "AvsB") == "A"
    assert rr.editreward_label("C>A>B", "AvsC") == "B"
    assert rr.editreward_label("D>B>A>C", "BvsD") == "B"
    # 2-way rows: ties, and rows whose comparison_type is missing get their pair from the ranking
    assert rr.editreward_label("A=B=Good", None) == "tie"
    assert rr.editreward_label("A=B=Bad", "") == "tie"
    assert rr.editreward_label("B>A", None) == "B"
    assert rr.editreward_label("A>B", float("nan") if False else None) == "A"
    # unusable: a full ranking without the pair, a malformed string, a pair not in the ranking
    assert rr.editreward_label("C>A>B", None) is None
    assert rr.editreward_label("A>>B", "AvsB") is None
    assert rr.editreward_label("A>B", "AvsC") is None and rr.editreward_label(None, "AvsB") is None


def test_wilson_interval_by_hand():
    low, high = rr.wilson_interval(8, 10)  # the textbook 95% Wilson interval of 8/10
    assert (round(low, 3), round(high, 3)) == (0.490, 0.943)
    assert rr.wilson_interval(0, 5)[0] == 0.0 and rr.wilson_interval(0, 0) == (None, None)


def red_judge(payload):
    """Pairwise: the red image gets 4 on text faithfulness, any other 1; the other dimensions equal
    (an edit reply has all four, as the official edit parsers require)."""
    urls = images_in(payload)
    cols = [dominant_colour(u) for u in urls][-2:]  # the source (edit) comes first
    sa, sb = (4 if cols[0] == "red" else 1), (4 if cols[1] == "red" else 1)
    edit = len(urls) > 2
    return (
        "# User Request Analysis\nx\n# Detailed Judgement\n1. Text Faithfulness:\n"
        f"## Score A: {sa}\n## Score B: {sb}\n"
        + ("2. Image Faithfulness:\n## Score A: 3\n## Score B: 3\n" if edit else "")
        + f"{3 if edit else 2}. Physical and Visual Quality:\n## Score A: 3\n## Score B: 3\n"
        + ("4. Text Rendering:\n## Score A: N/A\n## Score B: N/A\n" if edit else "")
        + "# Summary: s"
    )


def test_benchmark_accuracy_is_exact_with_a_scripted_judge(tmp_path, scripted_server, capsys):
    genai_t2i(tmp_path), editreward(tmp_path)
    server = scripted_server(red_judge)
    argv = ["eval", "--scorer", "served", "--scorer-api-base", server.url]
    for name in ("genai-bench-t2i", "editreward-bench"):
        assert rr.main(argv + ["--benchmark", name, "--data-dir", str(tmp_path / name),
                               "--out", str(tmp_path / "runs" / name)]) == 0
    printed = capsys.readouterr().out
    t2i = json.loads((tmp_path / "runs" / "genai-bench-t2i" / "metrics.json").read_text())
    # A red/B blue -> A right; blue/red -> B right; red/blue tie vote -> predicted A;
    # blue/blue both-bad -> tie.
    # Paper protocol (official rm_inference + compute_pairwise_accuracy): the two tie votes carry
    # no label
    assert (t2i["labelled"], t2i["correct"], t2i["accuracy"]) == (2, 2, 1.0)
    assert t2i["mode"] == "pairwise"
    assert t2i["skipped_rows"] == {"unlabelled": 0, "missing_image": 0, "unreadable_image": 1,
                                   "tie_or_both_bad_votes": 2, "failed_requests": 0,
                                   "unparsed_replies": 0}
    assert t2i["accuracy_with_ties"] == pytest.approx(3 / 4) and t2i["pairs"] == 4
    assert t2i["difference"] == pytest.approx(100.0 - 69.8)
    assert t2i["ci95"] == list(rr.wilson_interval(2, 2))
    er = json.loads((tmp_path / "runs" / "editreward-bench" / "metrics.json").read_text())
    # g1 red/blue A: right; AvsB red/blue A: right; AvsC red/green labelled C: wrong;
    # blue/green tie: right
    assert er["accuracy"] == pytest.approx(3 / 4) and er["labelled"] == 4
    assert '"benchmark": "editreward-bench"' in printed and '"paper": 69.8' in printed
    # a rerun resumes: no new request
    n = len(server.requests)
    assert rr.main(argv + ["--benchmark", "genai-bench-t2i", "--data-dir",
                           str(tmp_path / "genai-bench-t2i"), "--out",
                           str(tmp_path / "runs" / "genai-bench-t2i")]) == 0
    assert len(server.requests) == n


def test_missing_benchmark_data_is_one_clear_error(tmp_path):
    res = run_cli("rationalrewards.py", "eval", "--benchmark", "genai-bench-edit", "--scorer",
                  "tiny-random", "--out", tmp_path / "o")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "hf download TIGER-Lab/GenAI-Bench --repo-type dataset" in res.stderr
    assert "image_edition" in res.stderr
    res = run_cli("rationalrewards.py", "eval", "--benchmark", "mmrb2-t2i", "--scorer",
                  "tiny-random")
    assert res.returncode == 2 and "facebookresearch/MMRB2" in res.stderr


def test_benchmark_cli_with_tiny_random(tmp_path):
    genai_edit(tmp_path)
    res = run_cli("rationalrewards.py", "eval", "--benchmark", "genai-bench-edit", "--data-dir",
                  tmp_path / "genai-bench-edit", "--scorer", "tiny-random", "--scorer-max-new-tokens", "16",
                  "--out", tmp_path / "run")
    assert res.returncode == 0, res.stderr[-2000:]
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    # tiny-random's noise has no Score lines: each edit reply is unparsed (or empty: failed)
    assert m["pairs"] + m["unparsed"] + m["failed"] == 2
    assert m["mode"] == "pairwise" and m["paper"] == 80.1
    assert json.loads(res.stdout)["benchmark"] == "genai-bench-edit" and "ci95" in m


def test_failed_requests_are_counted_and_retried_not_scored_as_ties(tmp_path, scripted_server,
                                                                    capsys):
    """Official: a request with no reply is success = False, left out of the accuracy, counted as
    skipped."""
    genai_t2i(tmp_path)
    down = {"on": True}

    def flaky(payload):
        from conftest import text_in
        return 500 if down["on"] and "a red dog" in text_in(payload) else red_judge(payload)
    server = scripted_server(flaky)
    argv = ["eval", "--scorer", "served", "--scorer-api-base", server.url,
            "--benchmark", "genai-bench-t2i", "--data-dir", str(tmp_path / "genai-bench-t2i"),
            "--out", str(tmp_path / "run")]
    assert rr.main(argv) == 0
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    # the failed A/B pair is out
    assert (m["failed"], m["labelled"], m["correct"], m["pairs"]) == (1, 1, 1, 3)
    assert m["skipped_rows"]["failed_requests"] == 1
    records = common.read_jsonl(tmp_path / "run" / "predictions.jsonl")
    failed = [r for r in records if r.get("failed")]
    assert len(failed) == 1 and "Error code: 500" in failed[0]["error"]
    assert "predicted" not in failed[0]
    assert "retried by the next run" in capsys.readouterr().err
    # the next run into the same --out retries only the failed pair, and its record supersedes
    # the failure
    down["on"] = False
    n = len(server.requests)
    assert rr.main(argv) == 0
    assert len(server.requests) == n + 1
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert (m["failed"], m["labelled"], m["correct"]) == (0, 2, 2)


def test_truncated_replies_are_counted_and_warned(tmp_path, scripted_server, capsys):
    genai_t2i(tmp_path)
    cut = {"choices": [{"index": 0, "finish_reason": "length",
                        "message": {"role": "assistant", "content": "# Detailed Judgement\n"
                                                                    "1. Text Faithfulness:\n"
                                                                    "## Score A: 4\n## Score B: 1\n"
                                                                    "2. Physical and"}}]}
    server = scripted_server(lambda payload: cut)
    argv = ["eval", "--scorer", "served", "--scorer-api-base", server.url, "--benchmark", "genai-bench-t2i",
            "--data-dir", str(tmp_path / "genai-bench-t2i"), "--out", str(tmp_path / "run")]
    assert rr.main(argv) == 0
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["truncated_outputs"] == 4 and m["outputs"] == 4
    captured = capsys.readouterr()
    assert "4 of 4 outputs (100.0%) were cut" in captured.err and "--scorer-max-new-tokens" in captured.err
    # over HTTP the benchmark asks for the official budget; a --pairs eval keeps the paper's 2048
    assert {r["payload"]["max_tokens"] for r in server.requests} == {20480}
    assert json.loads((tmp_path / "run" / "args.json").read_text())["scorer_max_new_tokens"] \
        == 20480


def test_in_process_truncation_is_a_reply_without_an_end_token():
    model, processor = common.load_vlm("tiny-random")
    backend = common.TransformersBackend(model, processor)
    msgs = [rr.render_messages("pointwise_t2i", [solid("red")], request="a red cat")]
    # no end token allowed
    [out] = backend.generate(msgs, max_new_tokens=3, temperature=0, min_new_tokens=3)
    assert out.truncated and out.error is None


def test_mmrb2_edit_sends_every_source_image_first(tmp_path, scripted_server):
    mmrb2(tmp_path, "mmrb2-edit")
    server = scripted_server(red_judge)
    assert rr.main(["eval", "--scorer", "served", "--scorer-api-base", server.url, "--benchmark",
                    "mmrb2-edit", "--data-dir", str(tmp_path / "mmrb2-edit"), "--out",
                    str(tmp_path / "run")]) == 0
    from conftest import text_in
    by_count = sorted(
        (len(images_in(r["payload"])), text_in(r["payload"])) for r in server.requests)
    assert [n for n, _ in by_count] == [3, 5]  # 1 source + 2 candidates; 3 sources + 2 candidates
    assert "3 source images" in by_count[1][1] and "Source image 3 of 3" in by_count[1][1]
    largest = max(server.requests, key=lambda r: len(images_in(r["payload"])))
    cols = [dominant_colour(u) for u in images_in(largest["payload"])]
    assert cols[:3] == ["green", "red", "blue"]  # in the dataset's order, before the candidates
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["accuracy"] == 1.0 and m["labelled"] == 2


def run_benchmark(server, name, root):
    """eval --benchmark NAME over the scripted server; returns its metrics.json."""
    assert rr.main(["eval", "--scorer", "served", "--scorer-api-base", server.url, "--benchmark", name,
                    "--data-dir", str(root / name), "--out", str(root / "run")]) == 0
    return json.loads((root / "run" / "metrics.json").read_text())


# ---- replies the official scripts leave out (reward_model_evaluation/rm_inference/) ----
def edit_reply(sa, sb, dims=4):
    """A pairwise edit reply with the first `dims` of the four dimensions; text faithfulness
    carries the preference, the others are equal."""
    blocks = [("Text Faithfulness", sa, sb), ("Image Faithfulness", 3, 3),
              ("Physical and Visual Quality", 3, 3), ("Text Rendering", "N/A", "N/A")][:dims]
    body = "".join(f"{n}. {title}:\n## Justification: j\n## Score A: {a}\n## Score B: {b}\n"
                   for n, (title, a, b) in enumerate(blocks, 1))
    return "# User Request Analysis\nx\n# Detailed Judgement\n" + body + "# Summary: s"


def test_edit_replies_missing_a_dimension_are_left_out_as_the_official_parser_does(
        tmp_path, scripted_server, capsys):
    """genai-bench-edit, both rows labelled B. Row 1's reply is whole and prefers B. Row 2's reply
    stops after text faithfulness, which prefers A: the official edit parser raises on the missing
    Score lines (success = False), so compute_pairwise_accuracy.py sees 1 of 1 right. Judged on its
    partial scores with the 2.5 fallback it would be 1 of 2."""
    genai_edit(tmp_path)
    from conftest import text_in

    def judge(payload):
        return edit_reply(4, 1, dims=1) if "too" in text_in(payload) else edit_reply(1, 4)
    server = scripted_server(judge)
    m = run_benchmark(server, "genai-bench-edit", tmp_path)
    assert (m["labelled"], m["correct"], m["accuracy"]) == (1, 1, 1.0)
    assert m["unparsed"] == 1 and m["skipped_rows"]["unparsed_replies"] == 1
    assert m["failed"] == 0
    assert '"unparsed": 1' in capsys.readouterr().out
    # not a failure: a rerun does not ask again
    n = len(server.requests)
    run_benchmark(server, "genai-bench-edit", tmp_path)
    assert len(server.requests) == n


def test_a_text_to_image_reply_missing_a_dimension_keeps_the_fallback():
    """The official t2i parsers write N/A for a missing score (compute_pairwise_accuracy.py: 2.5):
    such a reply is judged, not left out."""
    j = rr.parse_pairwise("1. Text Faithfulness:\n## Score A: 4\n## Score B: 1\n", "t2i")
    assert not j.complete and j.preferred == "A"  # 4 + 2.5 + 2.5 against 1 + 2.5 + 2.5


def test_empty_replies_are_failures_on_every_benchmark(tmp_path, scripted_server):
    """HTTP 200 with "" content: the official `if evaluation_response:` marks it success = False.
    genai-bench-t2i's two A/B pairs (red/blue A, blue/red B): the first reply is empty, so 1 of 1;
    scored as a tie it would have been 1 of 2."""
    genai_t2i(tmp_path)

    def judge(payload):
        cols = [dominant_colour(u) for u in images_in(payload)]
        return "" if cols == ["red", "blue"] else red_judge(payload)
    m = run_benchmark(scripted_server(judge), "genai-bench-t2i", tmp_path)
    # the red/blue A vote and the red/blue tie vote both got ""
    assert m["failed"] == 2 and (m["labelled"], m["correct"]) == (1, 1)
    records = common.read_jsonl(tmp_path / "run" / "predictions.jsonl")
    failed = [r for r in records if r.get("failed")]
    assert {r["error"] for r in failed} == {"empty reply"}


def test_the_last_score_line_of_a_block_counts_as_in_the_official_parsers():
    text = ("1. Text Faithfulness:\n## Score A: 2\n## Score B: 3\n## Justification: on reflection\n"
            "## Score A: 4\n2. Physical and Visual Quality:\n## Score A: 3\n## Score B: 3\n")
    j = rr.parse_pairwise(text, "t2i")
    assert (j.scores_a["text_faithfulness"], j.scores_b["text_faithfulness"]) == (4.0, 3.0)
    assert j.preferred == "A"
    c = rr.parse_pointwise("1. Text Faithfulness:\n## Score: 1\n## Score: 3.5\n", "t2i")
    assert c.scores["text_faithfulness"] == 3.5


def test_benchmark_ids_that_differ_only_in_unsafe_characters_keep_their_own_images(tmp_path):
    """ids g7/AvsB and g7_AvsB once mapped to one cached file: the second row was judged on the
    first row's images."""
    write_parquet(tmp_path / "er" / "train.parquet", {
        "id": ["g7/AvsB", "g7_AvsB"], "instruction": ["make it red"] * 2,
        "source_image": [png("green")] * 2, "candidate_1": [png("red"), png("blue")],
        "candidate_2": [png("blue"), png("red")], "ranking": ["A>B", "B>A"],
        "comparison_type": ["AvsB", "AvsB"], "dataset": ["2pair"] * 2,
    }, image_columns=("source_image", "candidate_1", "candidate_2"))
    pairs, _ = rr.benchmark_pairs("editreward-bench", str(tmp_path / "er"), None,
                                  tmp_path / "images")
    from PIL import Image
    colours = [dominant_colour_of(Image.open(p["image_a"])) for p in pairs]
    assert colours == ["red", "blue"] and pairs[0]["image_a"] != pairs[1]["image_a"]


def dominant_colour_of(image):
    r, g, b = image.convert("RGB").resize((1, 1)).getpixel((0, 0))
    return ("red", "green", "blue")[max(range(3), key=lambda i: (r, g, b)[i])]


@pytest.mark.parametrize("dropped", ["right_image", "left_image", "vote_type", "prompt"])
def test_a_benchmark_copy_without_a_required_column_is_one_error(tmp_path, dropped):
    cols = {"prompt": ["a red cat"], "left_image": [png("red")], "right_image": [png("blue")],
            "vote_type": ["leftvote"]}
    del cols[dropped]
    write_parquet(tmp_path / "g" / "t.parquet", cols,
                  image_columns=[c for c in ("left_image", "right_image") if c in cols])
    with pytest.raises(ValueError, match=f"has no column\\(s\\) {dropped}"):
        rr.benchmark_pairs("genai-bench-t2i", str(tmp_path / "g"), None, tmp_path / "images")
