"""The toy world of "Watch PARROT work" (issue 35): a demonstration teacher whose failures are
known, so that Phase 2 can be scored, and a tiny student that learns from what it keeps. A
simulation, named as one: `--teacher toy` is no VLM."""
import json

import pytest
from PIL import Image

import common
import parrot
from conftest import run_cli

SEEN = {"text_faithfulness": 4.0, "physical_quality": 4.0, "text_rendering": "N/A",
        "asked": "red", "seen": "red"}


def test_the_toy_sees_colour_count_and_noise_but_not_letters(tmp_path):
    red = parrot.draw_scene("red", "circle", 1)
    assert common.toy_look(red, "a red circle on a white background") == SEEN
    assert common.toy_look(red, "a blue circle")["text_faithfulness"] == 1.5  # wrong colour
    three = parrot.draw_scene("green", "square", 3)
    assert common.toy_look(three, "three green squares in a row")["text_faithfulness"] == 4.0
    two = common.toy_look(three, "two green squares in a row")
    assert two["text_faithfulness"] == 2.0 and (two["asked"], two["seen"]) == ("two green",
                                                                                "three green")
    import random
    noisy = parrot.degrade(red, random.Random(0))
    assert common.toy_look(noisy, "a red circle")["physical_quality"] == 1.5
    sign = parrot.draw_scene("blue", None, 1, "CAT")
    assert common.toy_look(sign, 'a blue sign with the word "CAT"')["text_rendering"] is None


def test_the_toy_rationale_says_what_it_saw_before_its_verdict():
    """The evidence a student can learn from: what each image shows, checked against the request,
    then the scores; a vague failure leaves the evidence out."""
    request = "three green squares in a row"
    a, b = (common.toy_look(parrot.draw_scene("green", "square", n), request) for n in (2, 3))
    text = common.toy_rationale(a, b, "B", "none")
    assert "The request asks for three green." in text
    assert ("A shows two green, not as asked; B shows three green, as asked. Image B is clearly "
            "better here.\n## Score A: 2.0\n## Score B: 4.0") in text
    assert "shows" not in common.toy_rationale(a, b, "B", "vague")


def rationale(tf, pq):
    """A hand-written Phase 1 rationale claiming (A, B) scores for two dimensions."""
    return (f"1. Text Faithfulness:\n## Score A: {tf[0]}\n## Score B: {tf[1]}\n"
            f"2. Physical and Visual Quality:\n## Score A: {pq[0]}\n## Score B: {pq[1]}\n")


def test_the_toy_check_weighs_claims_against_what_it_sees():
    bad = {**SEEN, "text_faithfulness": 1.5}  # image B has the wrong colour
    # verified: the colour gap it sees, 2 x 2.5 = 5 nats toward A
    assert common.toy_check(rationale((4, 1.5), (4, 4)), SEEN, bad) == pytest.approx(5.0)
    # hallucinated: a quality defect in B that is not there: -2 x 2.5 against A
    assert common.toy_check(rationale((4, 4), (4, 1.5)), SEEN, bad) == pytest.approx(-5.0)
    # vague: gaps of 0.3 commit to nothing and cost trust: -0.25 x 0.3 per dimension
    assert common.toy_check(rationale((3.3, 3), (3.3, 3)), SEEN, bad) == pytest.approx(-0.15)


def phase12(tmp_path, *flags, limit=120):
    out = tmp_path / "run"
    res = run_cli("parrot.py", "--dataset", "demo", "--limit", limit, "--teacher", "toy",
                  "--student", "tiny-random", "--phases", "12", "--out", out, *flags)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads((out / "report.json").read_text())


def test_phase2_drops_the_injected_failures_and_keeps_the_clean_rationales(tmp_path):
    report = phase12(tmp_path)
    table = report["toy_filter"]
    failed = [table[k] for k in ("hallucination", "label_ignoring", "vague")]
    assert all(t["rationales"] > 0 for t in failed)  # the default rate makes every kind
    assert sum(t["dropped"] for t in failed) >= 0.9 * sum(t["rationales"] for t in failed)
    clean = table["none"]
    assert clean["kept"] >= 0.9 * clean["rationales"], table
    # the blind spot (misspelled words): vague, non-predictive rationales, dropped
    blind = table["blind_spot"]
    assert blind["rationales"] > 0 and blind["dropped"] == blind["rationales"], table


def test_anchored_on_the_wrong_image_the_filter_drops_most(tmp_path):
    report = phase12(tmp_path, "--flip-labels", "--toy-failure-rate", "0", limit=60)
    assert report["kept"] <= 0.1 * report["phase2_pairs"], report


def test_the_toy_teacher_is_refused_where_it_cannot_work(tmp_path):
    res = run_cli("parrot.py", "--dataset", "hpdv3", "--teacher", "toy", "--out", tmp_path / "o")
    assert res.returncode == 2 and "demo" in res.stderr and "Traceback" not in res.stderr
    res = run_cli("parrot.py", "--teacher", "tiny-random", "--student", "toy",
                  "--out", tmp_path / "p")
    assert res.returncode == 2 and "student" in res.stderr and "Traceback" not in res.stderr


# the README's command (with 500 pairs, or 2 epochs, the student learns the noise barely or not)
WATCH = ("--dataset", "demo", "--teacher", "toy", "--student", "tiny-random", "--lora-r", "0",
         "--lr", "1e-3", "--epochs", "3", "--grad-accum", "1", "--max-pixels", "16384",
         "--limit", "800")


def watch(tmp_path, name, *flags):
    # its own Python, as a user runs it (in the test process, the same seeds gave other rounding:
    # 0.62, not 0.69, at 2 epochs), on one core: the two runs below go side by side
    res = run_cli("parrot.py", *WATCH, "--out", tmp_path / name, *flags, fresh=True,
                  env={"OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads((tmp_path / name / "report.json").read_text())["student"]


@pytest.mark.learning
def test_the_student_learns_from_the_kept_rationales_and_less_without_the_filter(tmp_path):
    """Phase 3 on a CPU: the held-out NLL falls, held-out pairwise accuracy rises by >= 0.2 with a
    95% interval above chance, and the defects the toy teacher sees reach 0.8 (0.75 each).
    Without Phase 2 (--no-filter) the same student, trained on every rationale for as many steps
    (2 epochs of its 2,157 samples, about 3 of the 1,398 kept), does worse."""
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(2) as pool:
        s, control = pool.map(lambda run: watch(tmp_path, *run), [
            ("kept",), ("no-filter", "--no-filter", "--epochs", "2")])
    before, after, control = s["before"], s["after"], control["after"]
    assert after["heldout_nll"] < before["heldout_nll"], s
    assert after["accuracy"]["pairwise"] >= before["accuracy"]["pairwise"] + 0.2, s
    assert after["interval95"]["pairwise"][0] > 0.5, s
    # the defects the toy teacher can see: noise, and a colour or count against the request
    seen = [after["by_defect"]["pairwise"][d] for d in ("physical_quality", "text_faithfulness")]
    assert min(seen) >= 0.75 and sum(seen) / 2 >= 0.8, s
    assert control["accuracy"]["pairwise"] <= after["accuracy"]["pairwise"] - 0.1, (control, after)
    # the README picture, drawn from these two runs
    res = run_cli("docs/watch_parrot_picture.py", tmp_path / "kept", tmp_path / "no-filter",
                  tmp_path / "watch.png")
    assert res.returncode == 0 and Image.open(tmp_path / "watch.png").size[0] > 800, res.stderr
