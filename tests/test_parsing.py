"""Parsers, aggregation and prompt rendering on hand-written model outputs (no model)."""
import json

import re

import pytest

import common
import rationalrewards as rr
from conftest import solid

CLEAN_POINTWISE = """# Detailed Judgement
1. Text Faithfulness:
## Justification: The bicycle is red and leans on a brick wall.
## Score: 3.5
2. Physical and Visual Quality:
## Justification: The front wheel is warped.
## Score: 2
3. Text Rendering:
## Justification: No text is requested.
## Score: N/A
# Summary: Faithful, but the wheel is broken.
# User Request Refinement:
## Refinement Comments: Ask for round wheels.
## Refined Request: a red bicycle with two perfectly round wheels leaning on a brick wall
"""

MESSY_POINTWISE = """<think>Let me look. Score: 1</think>
Sure! Here is my evaluation.
**# Detailed Judgement**
**2. Physical and Visual Quality:**
**## Justification:** Clean lines,
no artifacts.
**## Score:** [3]
**1.  Text Faithfulness:**
## Justification:   Missing the hat.
##   Score:    1.5/4
# Summary:   ok
"""

PAIRWISE = """# User Request Analysis
The user wants a cat wearing a hat.
# Detailed Judgement
1. Text Faithfulness:
## Justification: A has the hat; B does not.
## Score A: 4
## Score B: 2
## Winner: Image A
2. Physical and Visual Quality:
## Justification: B is sharper.
## Score A: 2.5
## Score B: 3.5
## Winner: Image B
3. Text Rendering:
## Justification: No text.
## Score A: N/A
## Score B: N/A
## Winner: N/A
# Summary: A is better overall.
"""


def test_pointwise_critique_gives_scores_na_justifications_and_refinement():
    c = rr.parse_pointwise(CLEAN_POINTWISE, "t2i")
    assert c.scores == {"text_faithfulness": 3.5, "physical_quality": 2.0, "text_rendering": None}
    assert c.not_applicable == ["text_rendering"]
    assert c.justifications["physical_quality"] == "The front wheel is warped."
    assert c.summary == "Faithful, but the wheel is broken."
    assert c.refinement_comments == "Ask for round wheels."
    assert c.refined_request == ("a red bicycle with two perfectly round wheels leaning on a brick "
                                 "wall")
    # R = (mean(3.5, 2) - 1) / 3 = 0.58333
    assert rr.reward_from_scores(c.scores) == pytest.approx(1.75 / 3)


def test_messy_pointwise_bold_fraction_brackets_preamble_out_of_order():
    c = rr.parse_pointwise(MESSY_POINTWISE, "t2i")
    # the "Score: 1" inside <think> is ignored; 1.5/4 -> 1.5; [3] -> 3;
    # text rendering missing -> None
    assert c.scores == {"text_faithfulness": 1.5, "physical_quality": 3.0, "text_rendering": None}
    assert c.not_applicable == []
    assert c.justifications["physical_quality"] == "Clean lines,\nno artifacts."
    assert c.summary == "ok"
    assert c.refined_request is None
    # R = (mean(1.5, 3) - 1) / 3 = 1.25 / 3
    assert rr.reward_from_scores(c.scores) == pytest.approx(1.25 / 3)


def test_unreadable_output_is_none_not_exception():
    for text in ["I cannot evaluate this image.", "", "## Score: banana",
                 "1. Text Faithfulness:\n## Score:"]:
        c = rr.parse_pointwise(text, "t2i")
        assert not c.readable
        assert set(c.scores) == {"text_faithfulness", "physical_quality", "text_rendering"}
        assert rr.reward_from_scores(c.scores) == 0.0
        j = rr.parse_pairwise(text, "edit")
        assert j.preferred is None


@pytest.mark.parametrize("raw,expected", [
    ("3.5", 3.5), ("**3.5**", 3.5), ("[3.5]", 3.5), ("3.5/4", 3.5), ("Score: 3", 3.0),
    ("  2 ", 2.0), ("7", 4.0), ("0", 1.0), ("-2", 1.0), ("N/A", "N/A"), ("n/a (no text)", "N/A"),
    ("NA", "N/A"), ("Not applicable", "N/A"), ("good", None), ("", None),
])
def test_score_field_forms_parse_to_a_number_na_or_none(raw, expected):
    assert rr.parse_score(raw) == expected


def test_out_of_range_scores_are_clamped_in_parse_and_reward():
    c = rr.parse_pointwise(
        "1. Text Faithfulness:\n## Score: 9\n2. Physical and Visual Quality:\n## Score: 0.2", "t2i")
    assert c.scores["text_faithfulness"] == 4.0 and c.scores["physical_quality"] == 1.0
    assert rr.reward_from_scores({"a": 10.0, "b": -3.0}) == pytest.approx(((4 + 1) / 2 - 1) / 3)


def test_edit_dimensions_and_unknown_numbered_title():
    text = """1. Text Faithfulness:
## Justification: The sky is now purple.
## Score: 4
2. Preservation of the source:
## Justification: The house changed colour too.
## Score: 2.5
3. Physical and Visual Quality:
## Score: 3
4. Text Rendering:
## Score: N/A
"""
    c = rr.parse_pointwise(text, "edit")
    assert c.scores == {"text_faithfulness": 4.0, "image_faithfulness": 2.5,
                        "physical_quality": 3.0, "text_rendering": None}
    assert c.justifications["image_faithfulness"] == "The house changed colour too."


def test_sentence_starting_with_dimension_name_is_not_a_header():
    text = ("1. Text Faithfulness:\n## Justification: fine\n"
            "Text rendering is not needed here, the request has no words.\n## Score: 3")
    c = rr.parse_pointwise(text, "t2i")
    assert c.scores["text_faithfulness"] == 3.0
    assert "Text rendering is not needed" in c.justifications["text_faithfulness"]


def test_pairwise_judgement_prefers_the_larger_score_sum_with_na_as_2_5():
    j = rr.parse_pairwise(PAIRWISE, "t2i")
    assert j.scores_a == {"text_faithfulness": 4.0, "physical_quality": 2.5, "text_rendering": None}
    assert j.scores_b == {"text_faithfulness": 2.0, "physical_quality": 3.5, "text_rendering": None}
    assert j.winners == {"text_faithfulness": "A", "physical_quality": "B", "text_rendering": None}
    # sums: A = 4 + 2.5 + 2.5(N/A) = 9.0, B = 2 + 3.5 + 2.5 = 8.0
    assert j.preferred == "A"
    assert j.summary == "A is better overall."


def test_pairwise_tie_and_missing_score():
    text = PAIRWISE.replace("## Score A: 4", "## Score A: 3").replace("## Score B: 2\n",
                                                                      "## Score B: 4\n")
    # A = 3 + 2.5 + 2.5 = 8.0, B = 4 + 3.5 + 2.5 = 10.0
    assert rr.parse_pairwise(text, "t2i").preferred == "B"
    # B's physical score unreadable -> counts 2.5: A = 4 + 2.5 + 2.5 = 9, B = 2 + 2.5 + 2.5 = 7
    unreadable_b = PAIRWISE.replace("## Score B: 3.5", "## Score B: ??")
    assert rr.parse_pairwise(unreadable_b, "t2i").preferred == "A"
    tie = "1. Text Faithfulness:\n## Score A: 3\n## Score B: 3\n## Winner: It's a tie"
    j = rr.parse_pairwise(tie, "t2i")
    assert j.preferred == "tie" and j.winners["text_faithfulness"] == "tie"


def test_preference_from_scores_and_weights():
    # A = 3 + 2.5(None) = 5.5; B = 2.5 + 3 = 5.5 -> tie
    assert rr.preference_from_scores({"tf": 3.0, "pq": None}, {"tf": 2.5, "pq": 3.0}) == "tie"
    # missing key counts 2.5
    assert rr.preference_from_scores({"tf": 3.0}, {"tf": 2.0, "pq": 4.0}) == "B"
    # weighted: (3*4 + 1*1) / 4 = 3.25 -> (3.25 - 1) / 3 = 0.75
    tf, pq, tr = rr.T2I_DIMENSIONS
    weighted = rr.reward_from_scores({tf: 4.0, pq: 1.0, tr: None}, {tf: 3.0, pq: 1.0})
    assert weighted == pytest.approx(0.75)
    assert rr.reward_from_scores({}) == 0.0 and rr.reward_from_scores({"tf": None}) == 0.0


def test_render_messages_places_images_in_order_and_checks_fields():
    a, b, src = solid("red"), solid("blue"), solid("green")
    msgs = rr.render_messages("pairwise_edit", [src, a, b], request="make it purple")
    content = msgs[0]["content"]
    assert [p["image"] for p in content if p["type"] == "image"] == [src, a, b]
    text = "".join(p["text"] for p in content if p["type"] == "text")
    assert "User Instruction: make it purple" in text and "{request}" not in text
    assert "## Score A:" in text and "## Winner:" in text  # the paper's headers survive verbatim
    with pytest.raises(ValueError, match="image slots"):
        rr.render_messages("pointwise_t2i", [a, b], request="x")
    with pytest.raises(ValueError, match="needs fields"):
        rr.render_messages("anchored_pairwise_t2i", [a, b], request="x")
    # a rationale that writes "<image>" or "{request}" (a tiny-random teacher's can) is text: not
    # an image slot, and not filled in turn (one pass)
    msgs = rr.render_messages("consistency_t2i", [a, b], request="x", rationale="<image> {request}")
    parts = msgs[-1]["content"]
    assert sum(p["type"] == "image" for p in parts) == 2
    assert "[image] {request}" in "".join(p["text"] for p in parts if p["type"] == "text")


POINTWISE_HEADERS = ("## Justification:", "## Score:", "# Summary:", "# User Request Refinement:",
                     "## Refinement Comments:", "## Refined Request:")
PAIRWISE_HEADERS = ("# User Request Analysis", "# Detailed Judgement", "## Justification:",
                    "## Score A:", "## Score B:", "## Winner:", "# Summary:")


@pytest.mark.parametrize("task", ["t2i", "edit"])
@pytest.mark.parametrize("template,headers,per_dimension", [
    ("pointwise", POINTWISE_HEADERS, "## Score:"),
    ("projection", POINTWISE_HEADERS, "## Score:"),
    ("pairwise", PAIRWISE_HEADERS, "## Winner:"),
    ("anchored_pairwise", PAIRWISE_HEADERS, "## Winner:"),
    ("consistency", ("{rationale}", "A or B"), None),
])
def test_each_template_keeps_its_own_paper_headers(task, template, headers, per_dimension):
    # issue 7.18: each file on its own, not the concatenation of several
    text = "\n".join(turn or "" for turn in rr.load_prompt(f"{template}_{task}"))
    missing = [h for h in headers if h not in text]
    assert not missing, f"{template}_{task}.txt lost {missing}"
    if per_dimension:  # one block per rubric dimension, each with its title
        assert text.count(per_dimension) == len(rr.dimensions(task))
        assert all(rr.DIMENSION_TITLES[d] in text for d in rr.dimensions(task))


def test_flags_come_from_the_dataclasses_with_their_docstrings(capsys):
    commands = {"score": rr.ScoreArgs, "eval": rr.EvalArgs}
    args = common.parse(commands, ["eval", "--pairs", "p.jsonl", "--limit", "3"])
    assert isinstance(args, rr.EvalArgs) and (args.pairs, args.limit) == ("p.jsonl", 3)
    args = common.parse(commands, ["score", "--prompt", "x", "--json", "--image", "a.png",
                                    "--image", "b.png"])
    assert isinstance(args, rr.ScoreArgs) and (args.json, args.image) == (True, ["a.png", "b.png"])
    with pytest.raises(SystemExit):
        common.parse(commands, ["score", "--scorer-quantization", "3bit"])
    with pytest.raises(SystemExit):
        common.parse(commands, ["score", "--pairs", "p.jsonl"])  # an eval flag given to score
    with pytest.raises(SystemExit):
        common.parse(commands, ["score", "--help"])
    assert "LoRA adapter folder on top of --scorer" in capsys.readouterr().out


def test_read_jsonl_cuts_a_torn_last_line(tmp_path):
    p = tmp_path / "x.jsonl"
    common.append_jsonl(p, {"id": "a"})
    common.append_jsonl(p, {"id": "b"})
    with open(p, "a") as f:
        f.write('{"id": "c", "val')  # killed mid-write
    assert [r["id"] for r in common.read_jsonl(p)] == ["a", "b"]
    common.append_jsonl(p, {"id": "c"})
    assert [json.loads(l)["id"] for l in p.read_text().splitlines()] == ["a", "b", "c"]


def test_preference_metrics_hand_computed():
    recs = [
        {"label": "A", "predicted": "A", "unreadable": False,
         "scores_a": {"text_faithfulness": 4.0}, "scores_b": {"text_faithfulness": 2.0}},
        {"label": "B", "predicted": "tie", "unreadable": False,
         "scores_a": {"text_faithfulness": 3.0}, "scores_b": {"text_faithfulness": 3.0}},
        {"label": "tie", "predicted": "tie", "unreadable": False, "scores_a": {}, "scores_b": {}},
        {"label": "A", "predicted": None, "unreadable": True, "scores_a": {}, "scores_b": {}},
    ]
    m = rr.preference_metrics(recs, "t2i")
    assert m["accuracy_with_ties"] == pytest.approx(2 / 4)
    assert m["accuracy_without_ties"] == pytest.approx(1 / 3)
    assert m["unreadable_outputs"] == 1 and m["predicted_ties"] == 2
    assert m["mean_scores"]["text_faithfulness"] == pytest.approx(3.0)  # (4 + 2 + 3 + 3) / 4
    assert m["mean_scores"]["physical_quality"] is None


def test_numbered_lists_and_short_sentences_inside_justifications_are_not_headers():
    text = """1. Text Faithfulness:
## Justification: Matches.
## Score: 4
2. Physical and Visual Quality:
## Justification: Issues:
1. The hand has six fingers.
2. The shadow falls the wrong way.
Text rendering is fine.
## Score: 2
3. Text Rendering (if applicable):
## Justification: none requested
## Score: N/A
"""
    c = rr.parse_pointwise(text, "t2i")
    assert c.scores == {"text_faithfulness": 4.0, "physical_quality": 2.0, "text_rendering": None}
    assert c.not_applicable == ["text_rendering"]
    assert "six fingers" in c.justifications["physical_quality"]
    assert "Text rendering is fine." in c.justifications["physical_quality"]


@pytest.mark.parametrize("tf,pq,tr", [
    ("**Text Faithfulness:**", "**Physical and Visual Quality:**", "**Text Rendering:**"),
    ("Text Faithfulness:", "Physical Quality:", "Text Rendering:"),
    ("### Text Faithfulness", "### Physical & Visual Quality", "### Text Rendering"),
    ("Text Faithfulness", "Physical/Visual Quality", "Text Rendering (if applicable)"),
    ("1. Text Faithfulness:", "Physical and Visual Quality:", "3) **Text Rendering**"),
])
def test_unnumbered_and_bold_headers_open_their_own_dimension(tf, pq, tr):
    # Issue 7.1: the physical-quality score used to land under text faithfulness.
    text = f"""# Detailed Judgement
{tf}
## Justification: The cat wears the hat.
## Score: 4
{pq}
## Justification: Six legs on the cat.
## Score: 1.5
{tr}
## Justification: No text requested.
## Score: N/A
# Summary: faithful but malformed
"""
    c = rr.parse_pointwise(text, "t2i")
    assert c.scores == {"text_faithfulness": 4.0, "physical_quality": 1.5, "text_rendering": None}
    assert c.not_applicable == ["text_rendering"]
    assert c.justifications["physical_quality"] == "Six legs on the cat."
    # R = (mean(4, 1.5) - 1) / 3 = 1.75 / 3
    assert rr.reward_from_scores(c.scores) == pytest.approx(1.75 / 3)


def test_paper_field_order_score_before_justification():
    # Appendix C.4 writes "## Score:" first; the official templates write the justification first.
    text = """1. Text Faithfulness:
## Score: 2.5
## Justification: Only two apples,
not three.
**Physical and Visual Quality:**
## Score: 3.5
## Justification: Clean.
Text Rendering:
## Score: 1
## Justification: FRESH is spelled FRSEH.
# Summary: count and spelling are off
# User Request Refinement:
## Refinement Comments: Stress the count.
## Refined Request: exactly three red apples on a crate labelled "FRESH"
"""
    c = rr.parse_pointwise(text, "t2i")
    assert c.scores == {"text_faithfulness": 2.5, "physical_quality": 3.5, "text_rendering": 1.0}
    assert c.justifications["text_faithfulness"] == "Only two apples,\nnot three."
    assert c.justifications["text_rendering"] == "FRESH is spelled FRSEH."
    assert c.refined_request == 'exactly three red apples on a crate labelled "FRESH"'
    # pairwise in the same order, unnumbered
    pair = ("Text Faithfulness:\n## Score A: 4\n## Score B: 2\n## Justification: A has three.\n"
            "Physical Quality:\n## Score A: 2\n## Score B: 3\n## Winner: Image B\n")
    j = rr.parse_pairwise(pair, "t2i")
    assert j.scores_a["physical_quality"] == 2.0 and j.scores_b["physical_quality"] == 3.0
    assert j.scores_a["text_faithfulness"] == 4.0 and j.winners["physical_quality"] == "B"


def test_reward_rejects_weights_that_leave_zero_to_one():
    scores = {"text_faithfulness": 4.0, "physical_quality": 1.0}
    # (2*4 - 1*1) / 1 = 7 -> reward 2.0
    with pytest.raises(ValueError, match="finite numbers >= 0"):
        rr.reward_from_scores(scores, {"text_faithfulness": 2.0, "physical_quality": -1.0})
    with pytest.raises(ValueError, match="all zero"):
        rr.reward_from_scores(scores,
                              {"text_faithfulness": 0, "physical_quality": 0, "text_rendering": 0})
    with pytest.raises(ValueError, match="unknown reward dimension"):
        rr.reward_from_scores(scores, {"text_faithfullness": 1.0})
    # weight 0 drops a dimension: the official edit-RL reward without image faithfulness
    edit = {"text_faithfulness": 4.0, "image_faithfulness": 1.0, "physical_quality": 4.0,
            "text_rendering": None}
    assert rr.reward_from_scores(edit,
                                 rr.parse_weights("image_faithfulness=0")) == pytest.approx(1.0)
    assert rr.reward_from_scores(edit) == pytest.approx((3.0 - 1) / 3)  # mean(4, 1, 4) = 3
    with pytest.raises(ValueError, match="look like"):
        rr.parse_weights("text_faithfulness:2")


def test_quoted_word_at_the_end_of_a_refined_request_survives():
    c = rr.parse_pointwise('## Refined Request: a wooden sign that says "OPEN"', "t2i")
    assert c.refined_request == 'a wooden sign that says "OPEN"'
    c = rr.parse_pointwise('## Refined Request: "a calm lake at dawn"', "t2i")
    assert c.refined_request == "a calm lake at dawn"


def prompt_list(path):
    return [r["prompt"] for r in common.read_prompt_records(path)]


def test_prompt_lists_from_txt_and_jsonl(tmp_path):
    (tmp_path / "p.txt").write_text("# a comment\na red cat\n\n  two dogs  \n")
    assert prompt_list(tmp_path / "p.txt") == ["a red cat", "two dogs"]
    (tmp_path / "p.jsonl").write_text('{"prompt": "a red cat", "seed": 3}\n\n'
                                      '{"prompt": "#not a comment"}\n')
    assert prompt_list(tmp_path / "p.jsonl") == ["a red cat", "#not a comment"]
    (tmp_path / "bad.jsonl").write_text('{"text": "no prompt field"}\n')
    with pytest.raises(ValueError,
                       match="bad.jsonl:1: expected a JSON object with a non-empty 'prompt'"):
        prompt_list(tmp_path / "bad.jsonl")
    (tmp_path / "empty.txt").write_text("# only a comment\n")
    with pytest.raises(ValueError, match="holds no prompts"):
        prompt_list(tmp_path / "empty.txt")
    with pytest.raises(FileNotFoundError, match="prompt file"):
        prompt_list(tmp_path / "none.txt")


def test_a_later_unparseable_score_line_does_not_erase_a_parseable_one():
    # the RL reward's parser keeps the last parseable Score line of a block; so do we
    text = ("1. Text Faithfulness:\n## Score: 3.5\n## Justification: fine\n## Score: see above\n"
            "2. Physical and Visual Quality:\n## Score: 2\n## Score: 3\n3. Text Rendering:\n"
            "## Score: N/A\n")
    c = rr.parse_pointwise(text)
    assert c.scores == {"text_faithfulness": 3.5, "physical_quality": 3.0, "text_rendering": None}
    assert c.not_applicable == ["text_rendering"]


@pytest.mark.parametrize("module", ["rationalrewards", "parrot", "rl_nft", "gcr_loop"])
def test_help_reads_like_cleanrl(module, capsys):
    """--help: no `{None}|` type, each default said once, required flags first, the method's flags
    before the scorer's and those before output and run control (issue 34.5)."""
    import importlib
    mod = importlib.import_module(module)
    commands = [["score"], ["eval"]] if module == "rationalrewards" else [[]]
    for argv in commands:
        with pytest.raises(SystemExit):
            mod.main(argv + ["--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "{None}" not in text and "default: None) (default" not in text
        assert not re.search(r"\(default[^)]*\)[^-]*\(default", text), text  # said twice
        flags = [w for w in text.split() if w.startswith("--") and w[2:3].isalpha()]
        first = {f: flags.index(f) for f in flags[::-1]}
        if argv == ["score"]:
            assert first["--prompt"] < first["--task"] < first["--scorer"] < first["--device"]
        if module in ("rl_nft", "gcr_loop"):
            assert first["--task"] < first["--generator"] < first["--scorer"] < first["--seed"]
        if module == "rl_nft":
            assert first["--epochs"] < first["--lr"] < first["--scorer"] < first["--out"]
