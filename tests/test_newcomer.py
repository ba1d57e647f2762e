"""The newcomer's path (issue 17): repeated flags, the Python API with paths, --help without doubled
defaults, folders not locked by a run that produced nothing, one error style, an installable
package."""
import json
import shutil
import subprocess
import sys

import pytest
from PIL import Image

import common
import gcr_loop
import rationalrewards as rr
from conftest import ROOT, run_cli, solid


class Echo:
    """A backend that answers every critique with the same readable text."""
    batch_size = 8

    def generate(self, batch, *a, **k):
        return [
            "1. Text Faithfulness:\n## Score: 3\n2. Physical and Visual Quality:\n## Score: 4\n"
        ] * len(batch)


def test_repeated_image_flags_accumulate(image_dir):
    res = run_cli("rationalrewards.py", "score", "--scorer", "tiny-random", "--prompt", "x",
                  "--image", image_dir / "red.png", "--image", image_dir / "blue.png",
                  "--scorer-max-new-tokens", "4", "--json")
    assert res.returncode == 0, res.stderr[-1500:]
    images = [r["image"] for r in json.loads(res.stdout)]
    assert images == [str(image_dir / "red.png"), str(image_dir / "blue.png")]


def test_python_api_takes_paths_or_pil_images(image_dir):
    scorer = rr.RationalRewardsScorer(Echo(), "t2i")
    from_path = scorer.rewards([image_dir / "red.png", str(image_dir / "blue.png")], ["a", "b"])
    assert from_path == scorer.rewards([solid("red"), solid("blue")], ["a", "b"]) == pytest.approx(
        [5 / 6, 5 / 6])
    with pytest.raises(TypeError, match="PIL.Image.Image objects or paths"):
        scorer.critique([b"bytes"], ["a"])
    with pytest.raises(FileNotFoundError, match="missing"):
        scorer.critique([image_dir / "missing.png"], ["a"])
    edit = rr.RationalRewardsScorer(Echo(), "edit")
    assert len(edit.critique([image_dir / "red.png"], ["make it red"],
                             [image_dir / "green.png"])) == 1


def test_help_lists_every_flag_with_its_docstring_and_no_double_negatives():
    for argv in (["rationalrewards.py", "score"], ["rl_nft.py"], ["gcr_loop.py"], ["parrot.py"]):
        res = run_cli(*argv, "--help")
        assert res.returncode == 0
        text = " ".join(res.stdout.split())
        assert "--no-no-" not in text and "--device" in text, argv
    text = " ".join(run_cli("rl_nft.py", "--help").stdout.split())
    assert "--no-t5" in text and "collect -> reward -> optimise" in text


def test_a_run_that_failed_before_its_first_result_does_not_lock_the_folder(tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    solid("red").save(tmp_path / "a.png"), solid("blue").save(tmp_path / "b.png")
    pairs.write_text(
        json.dumps({"prompt": "red", "image_a": "a.png", "image_b": "b.png", "label": "A"}) + "\n")
    out = tmp_path / "eval"
    res = run_cli("rationalrewards.py", "eval", "--scorer", "someone/not-downloaded", "--pairs",
                  pairs, "--out", out)
    assert res.returncode == 2 and "hf download" in res.stderr
    res = run_cli("rationalrewards.py", "eval", "--scorer", "tiny-random", "--pairs", pairs, "--out",
                  out, "--scorer-max-new-tokens", "4")
    assert res.returncode == 0, res.stderr[-1500:]
    out = tmp_path / "gcr"
    res = run_cli("gcr_loop.py", "--generator", "someone/not-downloaded", "--scorer", "tiny-random",
                  "--prompt", "x", "--out", out)
    assert res.returncode == 2 and "hf download" in res.stderr
    res = run_cli("gcr_loop.py", "--generator", "tiny-random", "--scorer", "tiny-random",
                  "--prompt", "x", "--out", out)
    assert res.returncode == 0, res.stderr[-1500:]


def test_eval_without_inputs_names_both_ways():
    res = run_cli("rationalrewards.py", "eval", "--scorer", "tiny-random")
    assert res.returncode == 2 and "--pairs" in res.stderr and "--benchmark" in res.stderr
    assert res.stderr.startswith("error: ")


def test_pip_install_makes_imports_and_commands_work_from_anywhere(tmp_path):
    """pyproject.toml: the four modules, the prompts found from any working directory, four commands
    (a regular install into a folder; `pip install -e .` keeps the modules next to prompts/ in the
    checkout)."""
    target, src = tmp_path / "site", tmp_path / "src"
    # built from a copy: setuptools writes build/ and *.egg-info next to the sources it builds
    shutil.copytree(
        ROOT, src, ignore=shutil.ignore_patterns(".git", "runs", "build", "*.egg-info",
                                                 "__pycache__"))
    res = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                          "--no-build-isolation", "--target", str(target),
                          str(src)], capture_output=True, text=True, timeout=3600)
    assert res.returncode == 0, res.stderr[-2000:]
    env = {"PYTHONPATH": str(target), "PATH": ""}
    code = ("import common, rationalrewards, rl_nft, gcr_loop, parrot; "
            "d = common.PROMPTS_DIR; "
            "print(d.is_dir(), (d / 'pointwise_t2i.txt').is_file(), "
            "(common.PROMPTS_DIR / 'rl_edit_images' / 'house.png').is_file(), "
            "all((common.TINY / k / f).is_file() for k, f in [('qwen3vl', 'tokenizer.json'), "
            "('sd3', 'vae/config.json'), ('kontext', 'tokenizer_2/tokenizer.json')]))")
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         env=env)
    assert res.stdout.split() == ["True"] * 4, res.stderr[-2000:]  # tiny/ installed too
    scripts = {p.name for p in (target / "bin").iterdir()}
    assert {"rationalrewards", "parrot", "rl-nft", "gcr-loop"} <= scripts
    # the command runs from another folder and finds its templates
    res = subprocess.run(
        [str(target / "bin" / "rationalrewards"), "eval", "--scorer", "tiny-random"], cwd=tmp_path,
        capture_output=True, text=True, env={**env, "PATH": "/usr/bin:/bin"})
    assert res.returncode == 2 and res.stderr.startswith(
        "error: eval needs --pairs"), res.stderr[-1000:]


def test_parrot_lists_every_missing_input_at_once(tmp_path):
    """Offline: the headline command's student, dataset and teacher are all named in one message,
    each with its download command, before any work."""
    res = run_cli("parrot.py", "--dataset", "hpdv3", "--data-dir", tmp_path / "hpdv3", "--limit",
                  "10", "--out", tmp_path / "run", "--teacher", "Qwen/Qwen3-VL-8B-Instruct",
                  "--student", "Qwen/Qwen3-VL-2B-Instruct",
                  env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert res.returncode == 2 and "Traceback" not in res.stderr
    err = res.stderr
    assert "3 inputs of this run are missing" in err
    assert "hf download Qwen/Qwen3-VL-2B-Instruct" in err
    assert "hf download MizzenAI/HPDv3" in err and "hf download Qwen/Qwen3-VL-8B-Instruct" in err
    assert not (tmp_path / "run" / "phase1.jsonl").exists()


def test_parrot_says_how_to_start_a_teacher_server(tmp_path):
    res = run_cli("parrot.py", "--dataset", "demo", "--limit", "2", "--teacher-api-base",
                  "http://127.0.0.1:9/v1", "--student", "tiny-random", "--out", tmp_path / "run")
    assert res.returncode == 2 and "vllm serve Qwen/Qwen3-VL-8B-Instruct --port 8000" in res.stderr


def test_each_subcommand_shows_and_takes_only_its_own_flags():
    score, eval_ = run_cli("rationalrewards.py", "score",
                           "--help").stdout, run_cli("rationalrewards.py", "eval", "--help").stdout
    assert "--image STR" in score and "--pairs STR" not in score and "--benchmark {" not in score
    assert "--pairs STR" in eval_ and "--benchmark {" in eval_ and "--image STR" not in eval_
    res = run_cli("rationalrewards.py", "score", "--prompt", "x", "--image", "a.png", "--pairs",
                  "p.jsonl")
    assert res.returncode == 2 and "Unrecognized or misplaced options" in res.stderr
    assert "--pairs" in res.stderr


@pytest.mark.parametrize("argv", [
    ["rationalrewards.py", "score", "--prompt", "x", "--image", "a.png"],
    ["parrot.py", "--dataset", "demo", "--teacher", "tiny-random", "--student", "tiny-random"],
    ["rl_nft.py", "--generator", "tiny-random", "--scorer", "tiny-random"],
    ["gcr_loop.py", "--prompt", "x", "--generator", "tiny-random", "--scorer", "tiny-random"],
])
def test_device_flag_is_checked_before_any_model_loads(argv, tmp_path):
    """Every command takes --device; a name torch does not know, or a GPU this machine does not
    have, is one clear error before anything is loaded or written."""
    argv = argv + ([] if "score" in argv else ["--out", tmp_path / "o"])
    res = run_cli(*argv, "--device", "gpu0")
    assert res.returncode == 2 and "--device 'gpu0' is not a device" in res.stderr, res.stderr[
        -1000:]
    res = run_cli(*argv, "--device", "cuda:1", env={"CUDA_VISIBLE_DEVICES": ""})
    assert res.returncode == 2 and "--device cuda:1: 0 CUDA GPU(s) visible" in res.stderr, res.stderr[-1000:]
    assert not (tmp_path / "o").exists()


# ---- pictures (issue 17.12): the logic they draw with, and the pixels that carry a meaning ----
def test_wrap_text_breaks_between_words_never_inside_one():
    text = "a photograph of three red apples on a wooden table"
    lines = common.wrap_text(text, 14)
    assert all(len(line) <= 14 for line in lines) and " ".join(lines) == text
    # a long word gets its own line
    assert common.wrap_text("supercalifragilistic word", 5) == ["supercalifragilistic", "word"]


def test_every_picture_writes_a_missing_score_the_same_way():
    assert rr.score_label("text_faithfulness", 3.0) == "Text Faithfulness: 3.0"
    # the critique said so
    assert rr.score_label("text_rendering", None, ["text_rendering"]).endswith(": N/A")
    assert rr.score_label("text_rendering", None).endswith(": unreadable")  # it could not be read
    assert gcr_loop.slug("Three RED apples, on a table!") == "three-red-apples-on-a"
    assert gcr_loop.slug("!!!") == "prompt"


def test_reward_curve_names_a_dimension_without_readable_scores(tmp_path):
    import rl_nft
    rows = [{"epoch": e, "reward_mean": 0.5, "text_faithfulness": 3.0, "physical_quality": 2.0,
             "text_rendering": None} for e in range(1, 4)]
    labels = common.plot_reward_curve(rows, tmp_path / "curve.png", rr.T2I_DIMENSIONS, title="run")
    assert labels == ["reward R", "text faithfulness", "physical quality",
                      "text rendering (no readable score)"]
    assert Image.open(tmp_path / "curve.png").size == (760, 440)


def test_edit_sheets_and_eval_grids_show_the_source_beside_the_result(tmp_path):
    import gcr_loop
    for name, colour in (("src.png", "blue"), ("first.png", "red"), ("final.png", "green")):
        solid(colour).save(tmp_path / name)
    rnd = lambda image: {"image": image, "reward": 0.5, "scores": {"text_faithfulness": 3.0},
                         "request": "make it red"}
    rec = {"prompt": "make it red", "rounds": [rnd("first.png"), rnd("final.png")],
           "selected_round": 1, "stop_reason": "threshold"}
    gcr_loop.contact_sheet([rec], tmp_path, tmp_path / "t2i.png")
    gcr_loop.contact_sheet([{**rec, "source_image": str(tmp_path / "src.png")}], tmp_path,
                           tmp_path / "edit.png")
    t2i, edit = (Image.open(tmp_path / f).convert("RGB") for f in ("t2i.png", "edit.png"))
    assert (t2i.width, edit.width) == (2 * 262, 3 * 262)  # first | final; source | first | final
    assert edit.getpixel((100, 100)) == (0, 0, 255) and edit.getpixel((262 + 100, 100)) == \
        (255, 0, 0)
    # an eval grid cell of an edit: source | edited, side by side
    common.caption_grid([([solid("blue"), solid("green")], ["make it red", "R = 0.500"])],
                        tmp_path / "g.png", title="run: epoch 3")
    grid = Image.open(tmp_path / "g.png").convert("RGB")
    assert grid.width == 2 * 262
    assert grid.getpixel((100, 100)) == (0, 0, 255) and grid.getpixel((362, 100)) == (0, 128, 0)
