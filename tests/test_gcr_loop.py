"""gcr_loop.py: the gate on hand-written critiques, the loop with a recording generator and
scripted critiques, resume, and the smoke commands for both tasks."""
import json
import re

import pytest
from PIL import Image

import gcr_loop
import common
import rationalrewards as rr
from conftest import run_cli, solid, text_in

GATE = ("text_faithfulness", "physical_quality")


def crit(tf, pq, refined="a better request", tr="N/A"):
    text = (f"1. Text Faithfulness:\n## Justification: j\n## Score: {tf}\n"
            f"2. Physical and Visual Quality:\n## Justification: j\n## Score: {pq}\n"
            f"3. Text Rendering:\n## Score: {tr}\n# Summary: s\n# User Request Refinement:\n"
            "## Refinement Comments: c\n")
    return text + (f"## Refined Request: {refined}\n" if refined else "")


# ---- the decision of one round ----
@pytest.mark.parametrize("tf,pq,expected", [
    (3, 3, "passed"), (4, 3.5, "passed"),            # both at least the threshold
    (2.5, 4, "refine"), (4, 2.9, "refine"),          # either below
    (2, "??", "refine"),  # a readable failing score decides, even if the other is unreadable
    (4, "??", "unreadable"), ("??", "??", "unreadable"),
])
def test_gate_passes_only_when_every_gated_dimension_reaches_the_threshold(tf, pq, expected):
    assert gcr_loop.gate_decision(rr.parse_pointwise(crit(tf, pq), "t2i"), GATE, 3.0) == expected


def test_next_step_refines_below_threshold():
    low = rr.parse_pointwise(crit(2, 4, refined="three red apples, clearly three"), "t2i")
    step = lambda c, done: gcr_loop.next_step(c, GATE, 3.0, done, 1, "three apples")
    assert step(low, 0) == (None, "three red apples, clearly three")
    assert step(low, 1) == ("max_rounds", None)
    # no refined request: the official script regenerates from the original request
    no_refinement = rr.parse_pointwise(crit(2, 4, refined=None), "t2i")
    assert step(no_refinement, 0) == (None, "three apples")
    unreadable = rr.parse_pointwise("I cannot see an image.", "t2i")
    assert step(unreadable, 0) == ("unreadable_critique", None)
    # a gate on text rendering alone: N/A is unreadable for the gate
    readable = rr.parse_pointwise(crit(4, 4), "t2i")
    assert gcr_loop.gate_decision(readable, ("text_rendering",), 3.0) == "unreadable"


def test_summary_counts_refined_improved_and_worse_prompts_by_hand():
    recs = [{"rounds": [{"reward": 0.2, "truncated": True}, {"reward": 0.6}], "selected_round": 1,
             "stop_reason": "passed"},
            {"rounds": [{"reward": 0.5}, {"reward": 0.3}], "selected_round": 1,
             "stop_reason": "max_rounds"},
            {"rounds": [{"reward": 0.9}], "selected_round": 0, "stop_reason": "passed"}]
    s = gcr_loop.summarize(recs)
    assert s["prompts"] == 3 and s["share_refined"] == pytest.approx(2 / 3)
    assert s["mean_reward_first"] == pytest.approx(1.6 / 3)
    assert s["mean_reward_final"] == pytest.approx(1.8 / 3)
    assert s["share_improved"] == pytest.approx(1 / 3) and s["share_worse"] == pytest.approx(1 / 3)
    assert s["stop_reasons"] == {
        "passed": 2, "max_rounds": 1, "unreadable_critique": 0
    }
    assert (s["truncated_critiques"], s["critiques"]) == (1, 5)


# ---- the loop, with a recording generator and scripted critiques ----
class RecordingPipe:
    """Stands in for a diffusers pipeline: records each call's requests and seeds."""

    def __init__(self):
        self.calls = []

    def __call__(self, prompt, generator, num_inference_steps=None, guidance_scale=None,
                 height=None, width=None, image=None, **kw):
        self.calls.append({
            "prompts": list(prompt), "seeds": [g.initial_seed() for g in generator], "image": image,
            "size": (width, height), "steps": num_inference_steps
        })

        class Out:
            images = [solid((len(p) * 7 % 256, 0, 0)) for p in prompt]
        return Out()


class ScriptedScorer:
    """Critiques chosen per original request (the scorer always sees it) and per call count."""
    batch_size = 8

    def __init__(self, script):
        self.script, self.seen, self.requests = script, {}, []

    def generate(self, batch, *a, **k):
        out = []
        for msgs in batch:
            text = "".join(p["text"] for p in msgs[-1]["content"] if p["type"] == "text")
            request = re.search(r"User Instruction: (.*)", text).group(1)
            key = next(k for k in self.script if k in request)
            n = self.seen.get(key, 0)
            self.seen[key] = n + 1
            self.requests.append(key)
            replies = self.script[key]
            out.append(replies[min(n, len(replies) - 1)])
        return out


def run(tmp_path, script, prompts, **kw):
    args = gcr_loop.Args(prompt="x", out=str(tmp_path), **kw)
    pipe, backend = RecordingPipe(), ScriptedScorer(script)
    scorer = rr.RationalRewardsScorer(backend, args.task)
    (tmp_path / "images").mkdir(exist_ok=True)
    items = [{"id": f"id{i}", "prompt": p, "source_image": kw.get("source_image"), "seed": 100 + i}
             for i, p in enumerate(prompts)]
    recs = gcr_loop.run_batch(pipe, scorer, items, args, GATE if args.task == "t2i" else GATE, None,
                              tmp_path)
    return {r["prompt"]: r for r in recs}, pipe, backend


def test_low_then_high_regenerates_once_with_the_refined_request_and_the_same_seed(tmp_path):
    script = {"apples": [crit(2, 4, refined="exactly three red apples"), crit(3.5, 4)],
              "sky": [crit(4, 3.5)]}
    recs, pipe, backend = run(tmp_path, script, ["three apples", "a blue sky"])
    # round 0: both prompts in one batch; round 1: only the apples, refined, with its own seed again
    assert pipe.calls[0] == {"prompts": ["three apples", "a blue sky"], "seeds": [100, 101],
                             "image": None, "size": (1024, 1024), "steps": 40}
    assert pipe.calls[1]["prompts"] == ["exactly three red apples"]
    assert pipe.calls[1]["seeds"] == [100]
    assert len(pipe.calls) == 2
    apples, sky = recs["three apples"], recs["a blue sky"]
    assert apples["stop_reason"] == "passed" and len(apples["rounds"]) == 2
    assert [r["request"] for r in apples["rounds"]] == ["three apples", "exactly three red apples"]
    assert apples["rounds"][1]["scores"]["text_faithfulness"] == 3.5
    # above at first: no regeneration
    assert sky["stop_reason"] == "passed" and len(sky["rounds"]) == 1
    # the scorer judged the original request in both rounds: 3 critiques, each keyed by it
    assert sorted(backend.requests) == ["apples", "apples", "sky"]
    assert (tmp_path / apples["rounds"][1]["image"]).is_file()


def test_three_rounds_of_low_scores_give_three_refinements(tmp_path):
    script = {"hand": [crit(2, 2, refined=f"a hand, attempt {i}") for i in range(1, 9)]}
    recs, pipe, _ = run(tmp_path, script, ["a hand"], rounds=3)
    r = recs["a hand"]
    assert len(pipe.calls) == 4 and r["stop_reason"] == "max_rounds" and len(r["rounds"]) == 4
    requests = [c["prompts"][0] for c in pipe.calls]
    assert requests == ["a hand", "a hand, attempt 1", "a hand, attempt 2", "a hand, attempt 3"]
    assert all(c["seeds"] == [100] for c in pipe.calls)


def test_unreadable_stops_and_a_missing_refinement_falls_back_to_the_request(tmp_path):
    script = {"fog": ["The image shows fog."], "cat": [crit(1.5, 4, refined=None)],
              "dog": [crit(2, 2), crit(2.5, 2)]}
    recs, pipe, _ = run(tmp_path, script, ["fog", "cat", "dog"])
    assert recs["fog"]["stop_reason"] == "unreadable_critique" and len(recs["fog"]["rounds"]) == 1
    # no refined request: regenerated once from the original request (the official fallback)
    assert recs["cat"]["stop_reason"] == "max_rounds" and len(recs["cat"]["rounds"]) == 2
    assert [r["request"] for r in recs["cat"]["rounds"]] == ["cat", "cat"]
    assert recs["dog"]["stop_reason"] == "max_rounds" and len(recs["dog"]["rounds"]) == 2
    assert recs["fog"]["rounds"][0]["reward"] == 0.0


def test_edit_passes_the_source_to_generator_and_scorer_first(tmp_path):
    src = tmp_path / "src.png"
    solid("green").save(src)
    script = {"stormy": [crit(2, 4, refined="dark stormy clouds"), crit(4, 4)]}
    seen = []

    class Spy(ScriptedScorer):
        def generate(self, batch, *a, **k):
            seen.extend([p["image"] for p in m[-1]["content"] if p["type"] == "image"]
                        for m in batch)
            return super().generate(batch, *a, **k)
    args = gcr_loop.Args(prompt="x", out=str(tmp_path), task="edit")
    pipe = RecordingPipe()
    items = [{"id": "e", "prompt": "make the sky stormy", "source_image": str(src), "seed": 7}]
    scorer = rr.RationalRewardsScorer(Spy(script), "edit")
    (tmp_path / "images").mkdir()
    [rec] = gcr_loop.run_batch(pipe, scorer, items, args, GATE, None, tmp_path)
    assert rec["stop_reason"] == "passed" and len(pipe.calls) == 2
    # the source went to the generator
    assert pipe.calls[0]["image"][0].getpixel((0, 0)) == (0, 128, 0)
    # the official sizes: 40 steps, the source's aspect with the longer side <= 1024, x16
    assert pipe.calls[0]["steps"] == 40 and pipe.calls[0]["size"] == (64, 48)  # never enlarged
    assert gcr_loop.target_size((1500, 1000), 1024) == (1024, 688)
    assert gcr_loop.target_size((300, 200), 1024) == (304, 192)  # round(12.5) = 12, as Python
    # source first
    assert all(len(imgs) == 2 and imgs[0].getpixel((0, 0)) == (0, 128, 0) for imgs in seen)
    assert set(rec["rounds"][0]["scores"]) == set(rr.EDIT_DIMENSIONS)


# ---- the CLI ----
def test_rerun_skips_finished_prompts_and_sheets_are_written(tmp_path, scripted_server):
    def judge(payload):
        return crit(2, 4, refined="a sharper request") if "apples" in text_in(payload) else crit(
            4, 4)
    server = scripted_server(judge)
    prompts = tmp_path / "p.txt"
    prompts.write_text("three apples\na blue sky\n")
    argv = ["--generator", "tiny-random", "--scorer", "served", "--scorer-api-base", server.url,
            "--prompts", str(prompts), "--out", str(tmp_path / "run")]
    assert gcr_loop.main(argv) == 0
    out = tmp_path / "run"
    recs = common.read_jsonl(out / "gcr.jsonl")
    assert [r["stop_reason"] for r in recs] == ["max_rounds", "passed"]
    assert len(server.requests) == 3  # at most one critique per round
    for r in recs:
        # a prompt slug, then the id
        assert (out / "sheets" / f"{gcr_loop.slug(r['prompt'])}-{r['id']}.png").is_file()
        assert all((out / rnd["image"]).is_file() for rnd in r["rounds"])
    first_sheet = next((out / "sheets").glob(f"*-{recs[0]['id']}.png"))
    assert Image.open(out / "contact_sheet.png").height > Image.open(first_sheet).height
    summary = json.loads((out / "summary.json").read_text())
    assert summary["share_refined"] == 0.5 and summary["stop_reasons"]["max_rounds"] == 1
    # a new prompt added to the file: the rerun does only that one
    prompts.write_text("three apples\na blue sky\na red door\n")
    assert gcr_loop.main(argv) == 0
    assert len(server.requests) == 4 and len(common.read_jsonl(out / "gcr.jsonl")) == 3
    with pytest.raises(ValueError, match="--threshold"):  # other settings into the same --out
        gcr_loop.main(argv + ["--threshold", "3.5"])


def test_bad_arguments_are_clear(tmp_path):
    for argv, message in ((["--prompt", "x", "--prompts", "y.txt"], "exactly one of"),
                          (["--prompt", "x", "--task", "edit"], "needs a source image"),
                          (["--prompt", "x", "--gate", "text_faithfulness,image_faithfulness"],
                           "--gate takes"),
                          (["--prompt", "x", "--rounds", "0"], "--rounds must be a positive")):
        with pytest.raises(SystemExit, match=message):
            gcr_loop.main(["--out", str(tmp_path / "o"), *argv])
    with pytest.raises(common.ModelLoadError, match="needs a CUDA GPU"):
        gcr_loop.main(["--out", str(tmp_path / "q"), "--prompt", "x", "--generator", "tiny-random",
                       "--generator-quantization", "4bit", "--scorer", "tiny-random"])


def test_edit_smoke_command_writes_records_and_sheets(tmp_path):
    """The edit smoke command (the t2i one runs in tests/test_chain.py)."""
    solid("green", (64, 64)).save(tmp_path / "in.png")
    res = run_cli("gcr_loop.py", "--task", "edit", "--source-image", tmp_path / "in.png",
                  "--prompt", "make the sky stormy", "--generator", "tiny-random", "--scorer",
                  "tiny-random", "--out", tmp_path / "edit")
    assert res.returncode == 0, res.stderr[-3000:]
    [rec] = common.read_jsonl(tmp_path / "edit" / "gcr.jsonl")
    assert rec["task"] == "edit" and set(rec["rounds"][0]["scores"]) == set(rr.EDIT_DIMENSIONS)
    assert Image.open(tmp_path / "edit" / rec["final_image"]).size == (64, 64)


@pytest.mark.parametrize("content,message", [
    ('{"prompt": "a cat", "id": "x"}\n{"prompt": "a dog", "id": "x"}\n',
     r"p.jsonl:2: id 'x' is already used by .*p.jsonl:1"),
    ('{"prompt": "a cat", "seed": 1.9}\n',
     r"p.jsonl:1: 'seed' must be a non-negative integer, got 1.9"),
    ('{"prompt": "a cat", "seed": "abc"}\n', "'seed' must be a non-negative integer, got 'abc'"),
    ('{"prompt": "a cat", "seed": 1e23}\n', "'seed' must be a non-negative integer"),
    ('{"prompt": null}\n', r"p.jsonl:1: expected a JSON object with a non-empty 'prompt' string"),
    ('{"prompt": ["a", "b"]}\n', "non-empty 'prompt' string, got '{\"prompt\": \\[\"a\""),
    ('{"prompt": "  "}\n', "non-empty 'prompt' string"),
    ('{"prompt": "x", "source_image": 5}\n', r"p.jsonl:1: 'source_image' must be a path"),
    ('{"prompt": "x"}\n{"prompt": \n', r"p.jsonl:2: not valid JSON"),
])
def test_prompt_file_errors_name_the_line(tmp_path, content, message):
    f = tmp_path / "p.jsonl"
    f.write_text(content)
    with pytest.raises(ValueError, match=message):
        gcr_loop.read_items(gcr_loop.Args(prompts=str(f)))


def test_repeated_prompts_run_once_and_non_utf8_files_are_named(tmp_path, capsys):
    f = tmp_path / "p.jsonl"
    f.write_text(
        '{"prompt": "a cat", "seed": 1}\n{"prompt": "a cat", "seed": 1}\n{"prompt": "a dog"}\n'
        '{"prompt": "a cat", "seed": 2}\n')
    items = gcr_loop.read_items(gcr_loop.Args(prompts=str(f)))
    assert [(i["prompt"], i["seed"]) for i in items][::2] == [("a cat", 1), ("a cat", 2)]
    assert len(items) == 3
    assert len({i["id"] for i in items}) == 3 and "p.jsonl:2 repeats" in capsys.readouterr().err
    f.write_bytes('{"prompt": "café"}\n'.encode("latin-1"))
    with pytest.raises(ValueError, match=r"p.jsonl is not UTF-8 text"):
        gcr_loop.read_items(gcr_loop.Args(prompts=str(f)))


def test_the_same_command_writes_the_same_critiques(tmp_path):
    """The scorer samples: its random state is seeded per batch, so a rerun into a fresh --out
    repeats every critique and refined request (here tiny-random's, noise but seeded noise)."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cube\na blue ball on a table\n")
    runs = []
    for name in ("a", "b"):
        gcr_loop.main(["--prompts", str(prompts), "--generator", "tiny-random", "--scorer",
                       "tiny-random", "--out", str(tmp_path / name)])
        records = common.read_jsonl(tmp_path / name / "gcr.jsonl")
        runs.append({r["id"]: [(rd["critique"], rd["refined_request"]) for rd in r["rounds"]]
                     for r in records})
    assert len(runs[0]) == 2 and runs[0] == runs[1]
