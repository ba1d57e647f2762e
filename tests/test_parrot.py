"""PARROT in-process: pure logic, loaders on fixtures, phases with a scripted teacher, SFT."""
import dataclasses
import io
import json
import math
import re

import pytest

import parrot
import common
import rationalrewards as rr
from conftest import solid


def rationale(sa_tf, sb_tf, sa_pq=3, sb_pq=3, extra=""):
    return ("# User Request Analysis\nThe request.\n# Detailed Judgement\n1. Text Faithfulness:\n"
            f"## Justification: {extra}\n## Score A: {sa_tf}\n## Score B: {sb_tf}\n"
            "## Winner: Image A\n2. Physical and Visual Quality:\n## Justification: fine\n"
            f"## Score A: {sa_pq}\n## Score B: {sb_pq}\n## Winner: It's a tie\n3. Text Rendering:\n"
            "## Justification: no text\n## Score A: N/A\n## Score B: N/A\n## Winner: N/A\n"
            "# Summary: done")


class ScriptedTeacher:
    """Answers by the request text: 'consistent', 'contradict', 'unparseable', 'vague' pairs.

    A vague rationale's scores lean to the label, but a reader cannot tell why: P(y|x,z) = 0.3.
    """

    def __init__(self, fail_after=None):
        self.generate_calls, self.fail_after = 0, fail_after

    @staticmethod
    def _text(msgs):
        return "".join(p["text"] for p in msgs[-1]["content"] if p["type"] == "text")

    def generate(self, messages_batch, max_new_tokens=2048, temperature=0.1, min_new_tokens=0):
        self.generate_calls += 1
        if self.fail_after is not None and self.generate_calls > self.fail_after:
            raise KeyboardInterrupt  # the run is killed here
        out = []
        for msgs in messages_batch:
            text = self._text(msgs)
            label = re.search(r"Human Preference: Image ([AB])", text).group(1)
            request = re.search(r"User Instruction: (.*)", text).group(1)  # what to script on
            hi, lo = (4, 2) if label == "A" else (2, 4)
            if "contradict" in request:
                out.append(rationale(lo, hi))
            elif "unparseable" in request:
                out.append("I am not able to compare these images.")
            elif "vague" in request:
                a, b = (3, 2.5) if label == "A" else (2.5, 3)
                out.append(rationale(a, b, extra="VAGUE"))
            else:
                out.append(rationale(hi, lo))
        return out

    def answer_logprobs(self, messages_batch, answers=("A", "B")):
        res = []
        for msgs in messages_batch:
            text = self._text(msgs)
            j = rr.parse_pairwise(text.split("### Judgement to Check")[1], "t2i")
            if j.preferred is None:  # a rationale that says nothing: no evidence either way
                res.append({"A": math.log(0.5), "B": math.log(0.5)})
                continue
            p_pref = 0.3 if "VAGUE" in text else 0.9  # probability of the side the scores favour
            pa = p_pref if j.preferred == "A" else 1 - p_pref
            res.append({"A": math.log(pa), "B": math.log(1 - pa)})
        return res


def make_jsonl(tmp_path, prompts):
    tmp_path.mkdir(parents=True, exist_ok=True)
    for c in ("red", "blue"):
        solid(c).save(tmp_path / f"{c}.png")
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(
        json.dumps({"prompt": p, "image_a": "red.png", "image_b": "blue.png", "label": "A"}) + "\n"
        for p in prompts))
    return path


def args_for(tmp_path, **kw):
    return parrot.Args(**{"dataset": "jsonl", "out": str(tmp_path / "run"), "batch_size": 2, **kw})


# ---- pure logic ----
def test_consistency_verdict_buckets():
    good = rr.parse_pairwise(rationale(4, 2), "t2i")
    assert parrot.consistency_verdict(good, "A", 0.9, 0.5) is None
    assert parrot.consistency_verdict(good, "B", 0.9, 0.5) == "scores_contradict_label"
    assert parrot.consistency_verdict(good, "A", 0.4, 0.5) == "teacher_disagrees"
    # not a free pass
    assert parrot.consistency_verdict(good, "A", None, 0.5) == "unreadable_answer"
    assert parrot.consistency_verdict(good, "A", 0.5, 0.5) is None  # "at least" the threshold
    tie = rr.parse_pairwise(rationale(3, 3), "t2i")
    assert parrot.consistency_verdict(tie, "A", 0.9, 0.5) == "scores_contradict_label"
    no_idea = rr.parse_pairwise("no idea", "t2i")
    assert parrot.consistency_verdict(no_idea, "A", 0.9, 0.5) == "unparseable"


def test_log_p_label_normalises_over_the_two_answers():
    lp = parrot.log_p_label
    # in-process: log-probs over the whole vocabulary, P(A) = 0.02, P(B) = 0.06 -> P(B|x,z) = 0.75
    full = {"A": math.log(0.02), "B": math.log(0.06)}
    assert lp(full, "B") == pytest.approx(math.log(0.75))
    assert lp(full, "A") == pytest.approx(math.log(0.25))
    # a top-20 list: 0.6 and 0.2 -> 0.75 and 0.25 (the smallest listed plays no part)
    listed = {"A": math.log(0.6), "B": math.log(0.2), "min_listed": -3.0}
    assert lp(listed, "A") == pytest.approx(math.log(0.75))
    # B not listed counts at the smallest listed, 0.05: P(A) = 0.135 / 0.185, not 1.0 (issue 7.2)
    missing = {"A": math.log(0.135), "B": None, "min_listed": math.log(0.05)}
    assert lp(missing, "A") == pytest.approx(math.log(0.135 / 0.185))
    assert lp(missing, "B") == pytest.approx(math.log(0.05 / 0.185))
    # the text fallback: all mass on the named answer; the other floored, not -inf
    named = {"A": -math.inf, "B": 0.0}
    assert lp(named, "B") == 0.0 and lp(named, "A") == parrot.LOGP_FLOOR
    assert lp(None, "A") is None  # unreadable stays unreadable, never a coin flip
    # tiny probabilities do not underflow: P(A) = e^-800, P(B) = e^-801
    assert lp({"A": -800.0, "B": -801.0}, "A") == pytest.approx(-math.log1p(math.exp(-1)))


def test_projection_matches_and_largest_gap():
    crit = rr.parse_pointwise(
        "1. Text Faithfulness:\n## Score: 3.5\n2. Physical and Visual Quality:\n## Score: 2\n"
        "3. Text Rendering:\n## Score: N/A", "t2i")
    anchors = {"text_faithfulness": 4.0, "physical_quality": 2.0, "text_rendering": None}
    assert parrot.projection_matches(crit, anchors)
    # strays by 1.0
    assert not parrot.projection_matches(crit, {**anchors, "text_faithfulness": 2.5})
    # anchored but missing
    assert not parrot.projection_matches(crit, {**anchors, "text_rendering": 3.0})
    gap = parrot.largest_gap_dimension(
        {"text_faithfulness": 4, "physical_quality": 3, "text_rendering": None},
        {"text_faithfulness": 3.5, "physical_quality": 1, "text_rendering": 2})
    assert gap == "physical_quality"
    assert parrot.largest_gap_dimension({"text_faithfulness": 3}, {"text_faithfulness": 3}) is None


def test_ab_shuffle_is_seeded_and_balanced():
    def pairs_with(seed):
        return [parrot.make_pair("x", "t2i", f"p{i}", f"good{i}.png", f"bad{i}.png", seed=seed)
                for i in range(400)]

    pairs = pairs_with(0)
    for p in pairs:  # the preferred image is where the label says
        assert p[f"image_{p['label'].lower()}"].startswith("good")
    share_b = sum(p["label"] == "B" for p in pairs) / len(pairs)
    assert 0.4 < share_b < 0.6
    again = pairs_with(0)
    assert again == pairs
    other = pairs_with(1)
    assert [p["label"] for p in other] != [p["label"] for p in pairs]


def test_heldout_split_is_by_prompt():
    prompts = [f"prompt {i}" for i in range(2000)]
    held = [p for p in prompts if parrot.is_heldout(p, 0.1, 0)]
    assert 0.07 < len(held) / len(prompts) < 0.13
    assert held != [p for p in prompts if parrot.is_heldout(p, 0.1, 1)]  # the seed moves the split


def test_build_sft_keeps_pairs_of_one_prompt_on_one_side(tmp_path):
    # issue 7.19: two pairs share each prompt; whichever side a prompt lands on, both its pairs
    # go there
    kept = [{"id": f"{p}-{k}", "task": "t2i", "prompt": p, "image_a": "a.png", "image_b": "b.png",
             "source_image": None, "label": "A", "kept": True, "rationale": rationale(4, 2)}
            for p in (f"prompt {i}" for i in range(40)) for k in range(2)]
    for r in kept:
        common.append_jsonl(tmp_path / "phase2.jsonl", r)
    train, held = parrot.build_sft(tmp_path, parrot.Args(out=str(tmp_path), eval_fraction=0.3))
    side = {}
    for name, samples in (("train", train), ("held", held)):
        for s in samples:
            side.setdefault(s["id"].rsplit("-", 1)[0], set()).add(name)
    assert all(len(v) == 1 for v in side.values()) and len(side) == 40
    assert 0 < len(held) < len(train)


# ---- loaders ----
def test_hpdv3_loader_counts_missing_and_corrupt(tmp_path):
    root = tmp_path / "hpdv3"
    (root / "images").mkdir(parents=True)
    for n in ("g1", "b1", "g2", "b2", "g4"):
        solid("red").save(root / "images" / f"{n}.jpg")
    (root / "images" / "b3.jpg").write_bytes(b"\xff\xd8 truncated")
    solid("red").save(root / "images" / "g3.jpg")
    recs = [{
        "prompt": "one", "path1": "images/g1.jpg", "path2": "images/b1.jpg", "model1": "m",
        "confidence": 0.9
    }, {"prompt": "two", "path1": "images/g2.jpg", "path2": "images/b2.jpg"},
            {"prompt": "three", "path1": "images/g3.jpg", "path2": "images/b3.jpg"},
            {"prompt": "four", "path1": "images/g4.jpg", "path2": "images/nope.jpg"}]
    (root / "train.json").write_text(json.dumps(recs))
    args = parrot.Args(dataset="hpdv3", data_dir=str(root), out=str(tmp_path / "run"))
    pairs, stats = parrot.load_dataset_pairs(args)
    assert [p["prompt"] for p in pairs] == ["one", "two"]
    assert stats["skipped_corrupt_image"] == 1
    assert stats["skipped_missing_image"] == 1
    assert stats["rows_read"] == 4
    for p in pairs:  # path1 is the preferred image, wherever the shuffle put it
        assert "/g" in p[f"image_{p['label'].lower()}"]
    args.limit = 1
    assert len(parrot.load_dataset_pairs(args)[0]) == 1
    # issue 7.7: the same data named by another spelling of its path gives the same pair ids
    import os
    rel = os.path.relpath(root)
    assert rel != str(root)
    again = parrot.load_dataset_pairs(
        parrot.Args(dataset="hpdv3", data_dir=rel + "/", out=str(tmp_path / "run")))[0]
    assert [p["id"] for p in again[:2]] == [p["id"] for p in pairs]
    # issue 7.14: a broken index names the file and the row
    (root / "train.json").write_text("{not json")
    with pytest.raises(parrot.DataError, match=r"train.json is not valid JSON"):
        parrot.load_dataset_pairs(args)
    (root / "train.json").write_text(json.dumps([recs[0], {"prompt": "no paths"}]))
    with pytest.raises(parrot.DataError, match=r"train.json, row 1: expected string fields"):
        parrot.load_dataset_pairs(
            parrot.Args(dataset="hpdv3", data_dir=str(root), out=str(tmp_path / "run")))


def test_hpdv3_missing_gives_download_commands(tmp_path):
    with pytest.raises(parrot.DataError,
                       match=r"hf download MizzenAI/HPDv3 --repo-type dataset(.|\n)*tar -xzf"):
        parrot.load_dataset_pairs(
            parrot.Args(dataset="hpdv3", data_dir=str(tmp_path / "none"), out=str(tmp_path)))


def _png_bytes(color):
    buf = io.BytesIO()
    solid(color).save(buf, format="PNG")
    return buf.getvalue()


def test_rapidata_parquet_through_datasets(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    img = lambda b: {"bytes": b, "path": None}
    rows = [  # votes: clear A, clear B, exact tie, near tie (52%), corrupt image
        ("a red cat", img(_png_bytes("red")), img(_png_bytes("blue")), 9, 1),
        ("a blue dog", img(_png_bytes("red")), img(_png_bytes("blue")), 2, 8),
        ("tie", img(_png_bytes("red")), img(_png_bytes("blue")), 5, 5),
        ("close", img(_png_bytes("red")), img(_png_bytes("blue")), 52, 48),
        ("broken", img(b"not an image"), img(_png_bytes("blue")), 9, 1),
        ("after", img(_png_bytes("green")), img(_png_bytes("blue")), 7, 3),
    ]
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({"prompt": [r[0] for r in rows],
                      "image1": pa.array([r[1] for r in rows], image_type),
                      "image2": pa.array([r[2] for r in rows], image_type),
                      "votes_image1": [r[3] for r in rows], "votes_image2": [r[4] for r in rows]})
    pq.write_table(table, tmp_path / "train.parquet")
    args = parrot.Args(dataset="rapidata", hf_dataset=str(tmp_path / "train.parquet"),
                       out=str(tmp_path / "run"))
    pairs, stats = parrot.load_dataset_pairs(args)
    assert [p["prompt"] for p in pairs] == ["a red cat", "a blue dog", "after"]
    assert (stats["dropped_ties"], stats["dropped_near_ties"],
            stats["skipped_corrupt_image"]) == (1, 1, 1)
    for p, winner in zip(pairs, ("red", "blue", "green")):
        from conftest import dominant_colour
        import base64
        with open(p[f"image_{p['label'].lower()}"], "rb") as f:
            assert dominant_colour("data:," + base64.b64encode(f.read()).decode()) == winner
    args.limit = 1  # streaming: stops after the first valid pair
    pairs, stats = parrot.load_dataset_pairs(args)
    assert len(pairs) == 1 and stats["rows_read"] == 1


def test_editreward_parquet_is_an_edit_dataset(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    img = lambda c: {"bytes": _png_bytes(c), "path": None}
    table = pa.table({
        "instruction": ["make it blue", "make it green", "same"], "unique_key": ["k1", "k2", "k3"],
        "source_img": pa.array([img("red")] * 3, image_type),
        "left_output_image": pa.array([img("blue"), img("red"), img("red")], image_type),
        "right_output_image": pa.array([img("red"), img("green"), img("red")], image_type),
        "left_overall_score": [7.0, 3.0, 5.0], "right_overall_score": [3.0, 7.5, 5.0],
        "vote_type": ["leftvote", "rightvote", "tie"]})
    pq.write_table(table, tmp_path / "edit.parquet")
    args = parrot.Args(dataset="editreward", hf_dataset=str(tmp_path / "edit.parquet"),
                       out=str(tmp_path / "run"))
    pairs, stats = parrot.load_dataset_pairs(args)
    assert [p["id"] for p in pairs] == ["k1", "k2"] and stats["dropped_ties"] == 1
    assert all(p["task"] == "edit" and p["source_image"].endswith("-src.png") for p in pairs)


def test_demo_pairs_have_one_known_defect(tmp_path):
    pairs, _ = parrot.load_dataset_pairs(parrot.Args(dataset="demo", limit=30, out=str(tmp_path)))
    assert len({p["id"] for p in pairs}) == 30
    assert {p["defect_dimension"] for p in pairs} == {"text_faithfulness", "physical_quality",
                                                      "text_rendering"}
    for p in pairs:
        if p["defect_dimension"] == "text_rendering":
            assert '"' in p["prompt"]  # only word prompts get spelling defects
        a, b = common.load_image(p["image_a"]), common.load_image(p["image_b"])
        assert a.tobytes() != b.tobytes()
    again, _ = parrot.load_dataset_pairs(
        parrot.Args(dataset="demo", limit=30, out=str(tmp_path / "2")))
    assert [p["prompt"] for p in again] == [p["prompt"] for p in pairs]


# ---- Phases 1 and 2 with a scripted teacher ----
PROMPTS = ["consistent one", "contradict two", "unparseable three", "vague four", "consistent five",
           "contradict six"]


def run_phases_12(tmp_path, teacher, out_name="run", **kw):
    data = tmp_path / "data" / "pairs.jsonl"
    if not data.is_file():
        make_jsonl(data.parent, PROMPTS)
    args = args_for(tmp_path, data_dir=str(data), out=str(tmp_path / out_name), **kw)
    out = parrot.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pairs, inputs = parrot.load_dataset_pairs(args)
    parrot.anchored_generation(teacher, pairs, out, args)
    parrot.consistency_filter(teacher, out, args)
    return out, parrot.elbo_report(out, inputs, None)


def test_phases_put_each_rationale_in_the_right_bucket(tmp_path):
    out, report = run_phases_12(tmp_path, ScriptedTeacher())
    by_prompt = {r["prompt"]: r for r in common.read_jsonl(out / "phase2.jsonl")}
    assert by_prompt["consistent one"]["kept"] and by_prompt["consistent one"]["reason"] is None
    assert by_prompt["contradict two"]["reason"] == "scores_contradict_label"
    assert by_prompt["unparseable three"]["reason"] == "unparseable"
    assert by_prompt["vague four"]["reason"] == "teacher_disagrees"
    assert by_prompt["consistent one"]["log_p_label"] == pytest.approx(math.log(0.9))
    assert report["kept"] == 2
    assert report["phase2_pairs"] == 6
    assert report["phase1_parse_failures"] == 1
    assert report["drops_by_reason"] == {"unparseable": 1, "scores_contradict_label": 2,
                                         "unreadable_answer": 0, "teacher_disagrees": 1}
    assert report["retention_rate"] == pytest.approx(2 / 6)
    # ELBO term 1 over all six candidates of q, the dropped ones included (issue 7.3):
    # consistent x2: P(y)=0.9; contradicting x2: the teacher follows their scores, P(y)=0.1;
    # unparseable: 0.5; vague: 0.3
    term1 = (2 * math.log(0.9) + 2 * math.log(0.1) + math.log(0.5) + math.log(0.3)) / 6
    assert report["elbo_term1_all_candidates"] == pytest.approx(term1)
    assert report["elbo_term1_candidates_scored"] == 6
    assert report["mean_log_p_y_given_xz_kept"] == pytest.approx(math.log(0.9))
    # kept rationales: text faithfulness 4 vs 2 -> gap 2, physical 3 vs 3
    assert report["score_statistics"]["text_faithfulness"]["mean_abs_gap"] == pytest.approx(2.0)
    assert report["score_statistics"]["physical_quality"]["mean"] == pytest.approx(3.0)


def test_anchored_prompt_holds_the_label_and_the_consistency_prompt_hides_it(tmp_path):
    seen = []

    class Spy(ScriptedTeacher):
        def generate(self, mb, *a, **k):
            seen.extend(self._text(m) for m in mb)
            return super().generate(mb, *a, **k)

        def answer_logprobs(self, mb, answers=("A", "B")):
            seen.extend("CHECK" + self._text(m) for m in mb)
            return super().answer_logprobs(mb, answers)
    run_phases_12(tmp_path, Spy())
    anchored = [t for t in seen if not t.startswith("CHECK")]
    checks = [t for t in seen if t.startswith("CHECK")]
    assert anchored and all(re.search(r"Human Preference: Image [AB]", t) for t in anchored)
    assert checks and not any("Human Preference" in t for t in checks)


def test_candidates_first_passing_is_kept(tmp_path):
    class SecondTime(ScriptedTeacher):
        def generate(self, mb, *a, **k):  # candidate 0 contradicts, candidate 1 is consistent
            out = super().generate(mb, *a, **k)
            return [rationale(2, 4) if i % 2 == 0 and "Human Preference: Image A" in self._text(m) else o
                    for i, (m, o) in enumerate(zip(mb, out))]
    out, _ = run_phases_12(tmp_path, SecondTime(), num_candidates=2, batch_size=4)
    phase2 = common.read_jsonl(out / "phase2.jsonl")
    rec = next(r for r in phase2 if r["prompt"] == "consistent one")
    assert rec["kept"]
    assert [c["reason"] for c in rec["candidates"]][-1] is None
    assert len(common.read_jsonl(out / "phase1.jsonl")) == 12


def test_more_candidates_later_judges_exactly_the_new_ones(tmp_path):
    # Issue 7.10: Phase 1 rerun with a larger --num-candidates; Phase 2 must judge the new z only.
    class Counting(ScriptedTeacher):
        judged = []

        def answer_logprobs(self, mb, answers=("A", "B")):
            self.judged.append(len(mb))
            return super().answer_logprobs(mb, answers)
    out, first = run_phases_12(tmp_path, Counting(), num_candidates=1, batch_size=8)
    assert sum(Counting.judged) == 6 and first["elbo_term1_candidates_scored"] == 6
    Counting.judged.clear()
    out, second = run_phases_12(tmp_path, Counting(), num_candidates=3, batch_size=8)
    assert sum(Counting.judged) == 12  # 2 new candidates x 6 pairs, none of the 6 old ones again
    assert second["phase2_pairs"] == 6 and second["elbo_term1_candidates_scored"] == 18
    latest = parrot.read_phase2(out)
    assert all([c["candidate"] for c in r["candidates"]] == [0, 1, 2] for r in latest)
    assert second["kept"] == first["kept"] == 2  # the scripted teacher repeats itself per pair
    Counting.judged.clear()
    run_phases_12(tmp_path, Counting(), num_candidates=3, batch_size=8)
    assert Counting.judged == []  # nothing new: no teacher call


def test_unreadable_http_answer_drops_with_its_own_reason(tmp_path):
    class Mute(ScriptedTeacher):
        def answer_logprobs(self, mb, answers=("A", "B")):
            return [None] * len(mb)  # what OpenAIBackend returns for an answer it cannot read
    out, report = run_phases_12(tmp_path, Mute())
    assert report["kept"] == 0
    # self-consistent candidates (2 consistent + 1 vague) would have passed at P = 0.5 before
    assert report["drops_by_reason"]["unreadable_answer"] == 3
    assert report["unreadable_teacher_answers"] == 6 and report["elbo_term1_all_candidates"] is None


def test_killed_run_resumes_without_duplicates(tmp_path):
    ref_out, _ = run_phases_12(tmp_path, ScriptedTeacher(), "ref", batch_size=1)
    with pytest.raises(KeyboardInterrupt):
        run_phases_12(tmp_path, ScriptedTeacher(fail_after=3), "cut", batch_size=1)
    cut = tmp_path / "cut"
    assert len(common.read_jsonl(cut / "phase1.jsonl")) == 3
    run_phases_12(tmp_path, ScriptedTeacher(), "cut", batch_size=1)
    for name in ("phase1.jsonl", "phase2.jsonl"):
        got = (cut / name).read_text()
        assert got == (ref_out / name).read_text()  # same records, same order, nothing twice
        ids = [(r["id"], r.get("candidate")) for r in common.read_jsonl(cut / name)]
        assert len(ids) == len(set(ids)) == 6


# ---- Phase 3 ----
def test_sft_sample_has_no_label_and_masks_the_prompt(tmp_path):
    model, processor = common.load_vlm("tiny-random")
    solid("red").save(tmp_path / "a.png")
    solid("blue").save(tmp_path / "b.png")
    rec = {"id": "x", "task": "t2i", "prompt": "a red cat", "image_a": str(tmp_path / "a.png"),
           "image_b": str(tmp_path / "b.png"), "source_image": None}
    answer = rationale(4, 2)
    sample = parrot.sft_sample("pairwise", rec, answer)
    user = sample["messages"][-2]["content"]
    assert user.count("<image>") == 2 and "preferred" not in user and "annotator" not in user
    feats = parrot.sample_features(processor, sample, 64 * 64)
    labels, ids = feats["labels"][0], feats["input_ids"][0]
    n_prompt = int((labels == -100).sum())
    assert (labels[:n_prompt] == -100).all() and (labels[n_prompt:] != -100).all()
    assert processor.tokenizer.decode(ids[:n_prompt]).endswith("<|im_start|>assistant\n")
    assert processor.tokenizer.decode(labels[n_prompt:]).startswith(answer)


def test_foresight_distillation_lowers_loss_and_adapter_loads(tmp_path):
    import torch
    solid("red").save(tmp_path / "a.png")
    solid("blue").save(tmp_path / "b.png")
    rec = {"id": "x", "task": "t2i", "prompt": "a red cat", "image_a": str(tmp_path / "a.png"),
           "image_b": str(tmp_path / "b.png"), "source_image": None}
    train = [parrot.sft_sample("pairwise", rec, "## Score A: 4\n## Score B: 2"),
             parrot.sft_sample("pointwise", rec, "## Score: 4", "A")]
    args = parrot.Args(out=str(tmp_path), epochs=6, lr=3e-3, grad_accum=1, lora_r=8,
                       warmup_ratio=0.0)
    torch.manual_seed(0)
    model, processor = common.load_vlm("tiny-random", trainable=True)
    model = parrot.add_lora(model, args, quantized=False)
    before = parrot.answer_nll(model, processor, train, args.max_pixels)
    losses = parrot.foresight_distillation(model, processor, train, tmp_path, args)
    after = parrot.answer_nll(model, processor, train, args.max_pixels)
    assert len(losses) == 12 and after < before - 0.5
    assert sum(losses[-2:]) < sum(losses[:2])
    assert (tmp_path / "student" / "adapter_model.safetensors").is_file()
    loaded, proc = common.load_vlm("tiny-random", adapter=str(tmp_path / "student"))
    assert parrot.answer_nll(loaded, proc, train, args.max_pixels) == pytest.approx(after, rel=1e-3)
    scorer = rr.RationalRewardsScorer(common.TransformersBackend(loaded, proc), max_new_tokens=8)
    assert len(scorer.critique([solid("red")], ["a red cat"])) == 1


def test_qlora_student_trains_on_cpu(tmp_path):
    solid("red").save(tmp_path / "a.png")
    rec = {"id": "x", "task": "t2i", "prompt": "a red cat", "image_a": str(tmp_path / "a.png"),
           "image_b": str(tmp_path / "a.png"), "source_image": None}
    train = [parrot.sft_sample("pointwise", rec, "## Score: 4", "A")]
    args = parrot.Args(out=str(tmp_path), epochs=3, lr=3e-3, grad_accum=1, lora_r=8,
                       warmup_ratio=0.0)
    model, processor = common.load_vlm("tiny-random", quantization="4bit", device="cpu",
                                       trainable=True)
    model = parrot.add_lora(model, args, quantized=True)
    lora_b = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    # LoRA starts as a no-op
    assert lora_b and all(float(v.abs().sum()) == 0 for v in lora_b.values())
    losses = parrot.foresight_distillation(model, processor, train, tmp_path, args)
    moved = [n for n, p in model.named_parameters()
             if "lora_B" in n and float((p.detach() - lora_b[n]).abs().sum()) > 0]
    # every adapter got gradients through the 4-bit layers and checkpointing
    assert len(moved) == len(lora_b)
    assert losses[-1] < losses[0]


def test_projections_that_stray_from_their_anchors_are_dropped(tmp_path):
    solid("red").save(tmp_path / "a.png")
    solid("blue").save(tmp_path / "b.png")
    scores_a = {"text_faithfulness": 4.0, "physical_quality": 3.0, "text_rendering": None}
    scores_b = {"text_faithfulness": 2.0, "physical_quality": 3.0, "text_rendering": None}
    kept = [{
        "id": f"p{i}", "task": "t2i", "prompt": f"prompt {i}", "image_a": str(tmp_path / "a.png"),
        "image_b": str(tmp_path / "b.png"), "source_image": None, "label": "A", "kept": True,
        "rationale": rationale(4, 2), "scores_a": scores_a, "scores_b": scores_b
    } for i in range(2)]

    class Projector:
        # copies the anchors for image A, strays by 1.5 for image B
        def generate(self, mb, *a, **k):
            out = []
            for m in mb:
                text = ScriptedTeacher._text(m)
                tf = float(re.search(r"- Text Faithfulness: (\S+)", text).group(1))
                tf = tf if "this image was Image A" in text else tf + 1.5
                out.append(f"1. Text Faithfulness:\n## Score: {tf}\n2. Physical and Visual "
                           "Quality:\n## Score: 3\n3. Text Rendering:\n## Score: N/A\n"
                           "# User Request Refinement:\n## Refined Request: r")
            return out
    out = tmp_path / "run"
    out.mkdir()
    for r in kept:
        common.append_jsonl(out / "phase2.jsonl", r)
    args = parrot.Args(out=str(out), eval_fraction=0.0)
    parrot.project_pointwise(Projector(), kept, out, args)
    proj = common.read_jsonl(out / "projections.jsonl")
    kept = sorted((p["id"], p["side"], p["kept"]) for p in proj)
    assert kept == [("p0", "A", True), ("p0", "B", False), ("p1", "A", True), ("p1", "B", False)]
    train, held = parrot.build_sft(out, args)
    assert held == []
    assert sorted((s["id"], s["kind"], s["side"]) for s in train) == [("p0", "pairwise", None),
                                                                      ("p0", "pointwise", "A"),
                                                                      ("p1", "pairwise", None),
                                                                      ("p1", "pointwise", "A")]
    pointwise = next(s for s in train if s["kind"] == "pointwise")
    assert pointwise["images"] == [str(tmp_path / "a.png")]
    assert pointwise["messages"][-2]["content"].count("<image>") == 1


def test_phase3_trains_again_when_the_sft_data_changed(tmp_path, monkeypatch, capsys):
    # issue 7.10: Phase 3 returned early even when sft.jsonl had changed
    trained = []
    monkeypatch.setattr(parrot, "foresight_distillation",
                        lambda model, proc, train, out, args: trained.append(len(train)) or [0.0])
    monkeypatch.setattr(parrot, "student_report",
                        lambda *a, **k: {"heldout_nll": None, "accuracy": {}})

    monkeypatch.setattr(parrot, "add_lora", lambda model, args, q: model)
    out, _ = run_phases_12(tmp_path, ScriptedTeacher())
    args = args_for(tmp_path, epochs=1, student="tiny-random", eval_fraction=0.0, phases="3")

    class Copier(ScriptedTeacher):
        def release(self):
            pass

        def generate(self, mb, *a, **k):
            return [
                "1. Text Faithfulness:\n## Score: 4\n2. Physical and Visual Quality:\n## Score: 3"
            ] * len(mb)
    parrot.run_parrot(Copier(), out, args)
    first = len(common.read_jsonl(out / "sft.jsonl"))
    # 2 kept pairs: 2 pairwise samples + the projections kept
    assert trained == [first] and first >= 2
    parrot.run_parrot(Copier(), out, args)
    assert trained == [first]  # same data: nothing redone
    third = {**parrot.read_phase2(out)[2], "kept": True, "reason": None,
             "rationale": rationale(4, 2), **{f"scores_{s}": getattr(
                 rr.parse_pairwise(rationale(4, 2), "t2i"), f"scores_{s}") for s in "ab"}}
    common.append_jsonl(out / "phase2.jsonl", third)
    parrot.run_parrot(Copier(), out, args)
    second = len(common.read_jsonl(out / "sft.jsonl"))
    # a third kept pair: trained again, on all of it
    assert second > first and trained == [first, second]
    # issue 33.3: another --grad-accum or --warmup-ratio trains again, and says which changed
    parrot.run_parrot(Copier(), out, dataclasses.replace(args, grad_accum=2, warmup_ratio=0.2))
    assert trained == [first, second, second]
    err = capsys.readouterr().err
    assert "--warmup-ratio: 0.05 then, 0.2 now; --grad-accum: 8 then, 2 now since" in err


def test_a_rerun_with_another_teacher_is_refused_not_mixed(tmp_path):
    # issue 33.3: phase1.jsonl held rationales of two teachers, args.json overwritten
    data = tmp_path / "data" / "pairs.jsonl"
    make_jsonl(data.parent, PROMPTS[:2])
    argv = ["--dataset", "jsonl", "--data-dir", str(data), "--phases", "1", "--out",
            str(tmp_path / "run"), "--teacher", "tiny-random", "--max-new-tokens", "8"]
    assert parrot.main(argv) == 0
    lines = len(common.read_jsonl(tmp_path / "run" / "phase1.jsonl"))
    for flag, value in (("--temperature", "0.2"), ("--max-new-tokens", "9"),
                        ("--teacher", "tiny-random-2")):
        with pytest.raises(ValueError, match=f"{flag}: .* then, .* now"):
            parrot.main(argv + [flag, value])
    assert len(common.read_jsonl(tmp_path / "run" / "phase1.jsonl")) == lines
    assert json.loads((tmp_path / "run" / "args.json").read_text())["temperature"] == 0.7


def test_truncated_cached_images_are_rewritten_not_trusted(tmp_path):
    # issue 7.9: a run killed mid-write left a truncated PNG that crashed the next run in PIL
    args = parrot.Args(dataset="demo", limit=3, out=str(tmp_path))
    pairs, _ = parrot.load_dataset_pairs(args)
    victim = pairs[0]["image_a"]
    good = open(victim, "rb").read()
    open(victim, "wb").write(good[:40])  # what a kill mid-write leaves
    assert common.load_image(victim) is None
    again, stats = parrot.load_dataset_pairs(args)
    assert common.load_image(victim) is not None and open(victim, "rb").read() == good
    assert [p["id"] for p in again] == [p["id"] for p in pairs]
    assert stats["skipped_corrupt_image"] == 0
    assert not list(tmp_path.glob("images/.*.tmp*"))  # no temporary files left behind
    # the same for an image cached from a parquet cell
    path = tmp_path / "cell.png"
    path.write_bytes(b"\x89PNG\r\n truncated")
    assert common.save_embedded_image({"bytes": good}, path) is None
    assert common.load_image(path) is not None
    assert common.save_embedded_image({"bytes": b"junk"}, tmp_path / "x.png").startswith("corrupt")
    assert common.save_embedded_image({"bytes": None}, tmp_path / "y.png") == "missing"
