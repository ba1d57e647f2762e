"""Generate-Critique-Refine: the scorer's critique rewrites the request at test time.

The test-time half of Sec. 2.2 of "RationalRewards: Reasoning Rewards Scale Visual Generation Both
Training and Test Time" (arXiv 2604.11626). No training: a wrapper around any diffusers pipeline
and any RationalRewards scorer.

    round 0   image_0 = G(request, seed)
    round k   critique_k = scorer(image_k | original request)   one call: scores + refined request
              stop if every gating dimension s_d >= threshold   (default: text faithfulness and
                                                                  physical quality >= 3.0)
              else image_{k+1} = G(refined request_k, same seed)
    keep      the last image (paper)

The scorer always judges against the user's original request; the refined request is only the
generator's input. The seed stays fixed, so what changes between rounds is the request.

Where is (the method block runs in the loop's order; ``run_batch``, its last function, is the one
to read first):
    generate            ``prompt_seed`` (per prompt), ``generate``, ``target_size``    image_k
    critique            ``RationalRewardsScorer.critique`` (rationalrewards.py)      critique_k
    the gate            ``gate_decision``, then stop or refine: ``next_step``        s_d >= 3.0
    the report          ``round_record``, ``final_record`` (gcr.jsonl), ``summarize`` (the run)
    the loop            ``run_batch``: the rounds of a batch of prompts
    the harness         ``Args``, ``read_items``, the run's files, ``contact_sheet``, ``main``

Commands (a CPU smoke run, a real run on one GPU) and their outputs: README.md,
"Generate-Critique-Refine".

As the official scripts run it (TIGER-AI-Lab/RationalRewards test_time_prompt_tuning/:
prompt_tuning.py writes the critique, inference_with_refinedprompt.py regenerates): refinement is
skipped when text faithfulness and physical quality are both >= 3.0; a critique without a refined
request regenerates from the original request (`refined_request or prompt`); 40 denoising steps;
the image's longer side at most 1024 px, in multiples of 16 (`calculate_target_dimensions`).

Deviations from the paper and the official scripts:
1. `--rounds` (default 1, the paper's and the official script's) allows more refinements.
2. A critique whose gating dimensions cannot be read stops refinement for that prompt
   (`stop_reason` unreadable_critique); the official script reads a missing score as 0, refines.
3. Seeds: each prompt its own (from `--seed` and the prompt, or the .jsonl's `seed`), the same in
   every round; the official script gives every item seed 42. Per-prompt seeds keep items of one
   batch independent of each other's order.
4. Critiques stop at 2048 new tokens, the paper's figure (`prompt_tuning.py` allows 20,480).
5. The critique prompt is our pointwise template, the one the RL reward and the README's
   `build_i2i_messages` use; `prompt_tuning.py` has its own variant (no system turn, `## Score:`
   before `## Justification:`), which `--prompts-dir` can supply (the parser reads both orders).
"""
from __future__ import annotations

import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import common  # first: Ctrl-C while the libraries below import is one line, exit 130
from PIL import Image
from tqdm import tqdm

import rationalrewards as rr

STOP_REASONS = ("passed", "max_rounds", "unreadable_critique")
OFFICIAL_STEPS, OFFICIAL_MAX_EDGE = 40, 1024  # inference_with_refinedprompt.py's defaults


# ---- Generate: image_k = G(request_k, seed), the same seed in every round ----
def slug(text: str, words: int = 5) -> str:
    """A short file-name-safe form of a prompt: 'three-red-apples-and-the'."""
    return "-".join(re.findall(r"[a-z0-9]+", (text or "").lower())[:words]) or "prompt"

def prompt_seed(base_seed: int, prompt: str) -> int:
    """The generator seed of a prompt, the same in every round: what changes between rounds is the
    request alone, so a better image comes from a better request, not from another noise draw."""
    return int(common.digest(f"{base_seed}:{prompt}")[:8], 16)

def target_size(size: tuple, max_edge: int) -> tuple:
    """(width, height): the longer side at most max_edge, both rounded to multiples of 16, as the
    official script sizes an edit (inference_with_refinedprompt.py calculate_target_dimensions)."""
    w, h = size
    if max(w, h) > max_edge:  # shrunk (truncated to whole pixels), never enlarged
        w, h = int(w * max_edge / max(w, h)), int(h * max_edge / max(w, h))
    return max(16, round(w / 16) * 16), max(16, round(h / 16) * 16)  # Python's round, as theirs

def generate(pipe, requests: list, seeds: list, sources: list, args: Args) -> list:
    """The batch's images, every one from its own seeded generator: t2i at resolution x resolution;
    an edit at its source's size (longer side --resolution), one pipeline call per size."""
    import torch
    device = getattr(pipe, "_execution_device", None) or "cpu"
    edge = args.resolution or OFFICIAL_MAX_EDGE
    sizes = [target_size(s.size, edge) if args.task == "edit" else (edge, edge) for s in sources]
    images = [None] * len(requests)
    for size in dict.fromkeys(sizes):  # in order of first appearance
        idx = [i for i, s in enumerate(sizes) if s == size]
        kw = {"prompt": [requests[i] for i in idx], "width": size[0], "height": size[1],
              "generator": [torch.Generator(device).manual_seed(seeds[i]) for i in idx],
              "num_inference_steps": args.steps or OFFICIAL_STEPS}
        if args.guidance_scale is not None:
            kw["guidance_scale"] = args.guidance_scale
        if args.task == "edit":  # FLUX.1-Kontext: edit at this size, not at its preferred ~1 MP
            kw.update(image=[sources[i].resize(size, Image.LANCZOS) for i in idx],
                      max_area=size[0] * size[1], _auto_resize=False)
        for i, image in zip(idx, pipe(**kw).images):
            images[i] = image
    return images


# ---- The gate: stop when every gating dimension reaches the threshold, else refine ----
def gate_decision(critique: rr.Critique, gate: tuple, threshold: float) -> str:
    """'refine' when any readable gating dimension is below the threshold (whatever the others
    say), 'passed' when every one is readable and at least the threshold, else 'unreadable'."""
    scores = [critique.scores.get(d) for d in gate]
    if any(s is not None and s < threshold for s in scores):
        return "refine"
    return "passed" if all(s is not None for s in scores) else "unreadable"

def next_step(critique: rr.Critique, gate: tuple, threshold: float, refinements_done: int,
              max_rounds: int, original: str):
    """(stop_reason or None, request for the next round or None). A critique that asks for a
    refinement but writes no refined request regenerates from the `original` request, as the
    official script does (`refined_request or prompt`)."""
    decision = gate_decision(critique, gate, threshold)
    if decision != "refine":
        return ("passed" if decision == "passed" else "unreadable_critique"), None
    if refinements_done >= max_rounds:
        return "max_rounds", None
    return None, critique.refined_request or original


# ---- What GCR reports: each round, each prompt, the run ----
def round_record(round_: int, request: str, image: str, c: rr.Critique, weights) -> dict:
    """One of a record's `rounds`: the request the image came from, and the image's critique."""
    return {"round": round_, "request": request, "image": image, "scores": c.scores,
            "not_applicable": c.not_applicable, "reward": rr.reward_from_scores(c.scores, weights),
            "summary": c.summary, "refined_request": c.refined_request, "truncated": c.truncated,
            "critique": c.text}

def final_record(item: dict, task: str, state: dict) -> dict:
    """A prompt's line of gcr.jsonl: the item, its rounds, why it stopped, the image kept."""
    sel = len(state["rounds"]) - 1
    return {**item, "task": task, "rounds": state["rounds"], "stop_reason": state["stop"],
            "selected_round": sel, "final_image": state["rounds"][sel]["image"]}

def summarize(records: list) -> dict:
    """Over the run: how often GCR refined, and whether the kept image scored better than the first
    (R of round 0 vs R of the kept round)."""
    n = len(records)
    first = [r["rounds"][0]["reward"] for r in records]
    final = [r["rounds"][r["selected_round"]]["reward"] for r in records]
    share = lambda flags: sum(flags) / n if n else None
    return {
        "prompts": n, "share_refined": share([len(r["rounds"]) > 1 for r in records]),
        "mean_reward_first": share(first), "mean_reward_final": share(final),
        "share_improved": share([b > a + 1e-9 for a, b in zip(first, final)]),
        "share_worse": share([b < a - 1e-9 for a, b in zip(first, final)]),
        # critiques cut by the token limit lose their later dimensions or their refined request
        "truncated_critiques": sum(bool(x.get("truncated")) for r in records for x in r["rounds"]),
        "critiques": sum(len(r["rounds"]) for r in records),
        "stop_reasons": {k: sum(r["stop_reason"] == k for r in records) for k in STOP_REASONS}}


# ---- The loop: generate -> critique -> gate -> refine, round by round ----
def run_batch(pipe, scorer, items: list, args: Args, gate: tuple, weights, out: Path) -> list:
    """GCR for a batch of prompts: every round generates and critiques all prompts still
    refining; one record per prompt, with every round."""
    sources = read_sources(items)
    state = {it["id"]: {"request": it["prompt"], "rounds": [], "stop": None} for it in items}
    active = list(items)
    for round_ in range(args.rounds + 1):
        if not active:
            break
        ids = [it["id"] for it in active]
        src = [sources[i] for i in ids]
        # image_k = G(request_k, seed): request_0 is the user's, later ones the scorer's rewrites
        images = generate(pipe, [state[i]["request"] for i in ids], [it["seed"] for it in active],
                          src, args)
        # critique_k = scorer(image_k | original request): scores and refined request, one call
        seed_scorer(round_, ids)
        crits = scorer.critique(images, [it["prompt"] for it in active],
                                src if scorer.task == "edit" else None)
        for it, image, c in zip(active, images, crits):
            st, path = state[it["id"]], save_round_image(image, out, it["id"], round_)
            st["rounds"].append(round_record(round_, st["request"], path, c, weights))
            # gate: stop once every s_d >= threshold (or after N refinements), else
            # request_{k+1} = the refined request
            stop, refined = next_step(c, gate, args.threshold, round_, args.rounds, it["prompt"])
            st["stop"], st["request"] = stop, refined or st["request"]
        active = [it for it in active if not state[it["id"]]["stop"]]
    # keep: the last image of each prompt, as the paper does
    return [final_record(it, args.task, state[it["id"]]) for it in items]


# =======================================================================================
# The method ends here. Below: the `gcr_loop` command (flags, prompt file, the run's files).
# =======================================================================================
# --help lists the method's flags, then the scorer's, then output and run control: a dataclass
# takes its bases' fields in reverse order (_Method's first), its own last.
@dataclass
class _Method:
    task: Literal["t2i", "edit"] = "t2i"
    """t2i: text-to-image, three dimensions; edit: image editing, four, needs a source image"""
    prompt: Optional[str] = None
    """one request (or editing instruction)"""
    prompts: Optional[str] = None
    """many: .txt or .jsonl (`prompt`; optional `source_image` relative to it, `seed`, `id`)"""
    source_image: Optional[str] = None
    """edit: the image to edit (for --prompt, or for every line of a .txt --prompts)"""
    generator: Optional[str] = common.default_text("SD3.5-Medium t2i, FLUX.1-Kontext-dev edit")
    """hub id, local folder or tiny-random"""
    generator_quantization: Literal["none", "4bit"] = "none"
    """4bit: transformer and T5 in nf4 (needs a GPU; how FLUX.1-Kontext-dev fits in 24 GB)"""
    t5: bool = True
    """SD3 generators: load the T5 text encoder (--no-t5 leaves it out)"""
    steps: Optional[int] = common.default_text("40, the official script's; 4 for tiny-random")
    """denoising steps"""
    guidance_scale: Optional[float] = common.default_text("the pipeline's own")
    """guidance"""
    resolution: Optional[int] = common.default_text("1024, the official max edge; tiny-random 64")
    """longest image side in pixels; an edit keeps its source's aspect, in multiples of 16"""
    threshold: float = 3.0
    """refine while any gating dimension scores below this (paper: 3.0)"""
    gate: str = "text_faithfulness,physical_quality"
    """comma-separated gating dimensions (the official script's two)"""
    rounds: int = 1
    """at most this many refinements per prompt (paper: 1)"""
    reward_weights: Optional[str] = common.default_text("every dimension 1")
    """per-dimension weights of the reported reward, e.g. 'image_faithfulness=0'"""

@dataclass
class Args(rr.ScorerFlags, _Method):
    out: str = "runs/gcr"
    """run folder; rerunning into it skips the prompts already finished"""
    batch_size: int = 4
    """prompts generated and critiqued together"""
    seed: int = 0
    """base seed; each prompt's seed comes from it and the prompt (or from the .jsonl)"""
    device: Optional[str] = common.default_text("cuda if there is a GPU")
    """where the generator and the scorer run: cuda, cuda:1, cpu"""


# what the records of a run folder depend on: resuming with any of these changed is refused
RUN_KEYS = ("task", "generator", "scorer", "scorer_adapter", "scorer_api_base",
            "scorer_quantization", "scorer_max_new_tokens", "scorer_temperature", "max_pixels",
            "steps", "guidance_scale", "resolution", "threshold", "gate", "rounds",
            "reward_weights", "prompts_dir", "seed")


# ---- The loop's files: source images in, every round's image and record out ----
def read_sources(items: list) -> dict:
    """id -> the source image to edit (None for t2i), read once for every round; an unreadable
    one stops the batch before anything is generated."""
    sources = {it["id"]: common.load_image(it["source_image"]) if it["source_image"] else None
               for it in items}
    bad = [it["source_image"] for it in items if it["source_image"] and sources[it["id"]] is None]
    if bad:
        raise FileNotFoundError(f"cannot read source image(s): {', '.join(bad)}")
    return sources

def seed_scorer(round_: int, ids: list) -> None:
    """The scorer samples: seeded by the round and the batch, a rerun writes the same critiques."""
    import torch
    torch.manual_seed(int(common.digest(f"{round_}:{','.join(ids)}")[:8], 16))

def save_round_image(image: Image.Image, out: Path, item_id: str, round_: int) -> str:
    """Every round's image is kept, in images/; the path the records give, from the run folder."""
    path = out / "images" / f"{item_id}_r{round_}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    common.save_image_atomic(image, path)
    return str(path.relative_to(out))


# ---- The prompt file ----
def read_items(args: Args) -> list:
    """[{id, prompt, source_image, seed}], ids from the data (reruns find their records); the same
    (prompt, source, seed) twice runs once, and an `id` names one item only."""
    common.require(bool(args.prompt) != bool(args.prompts),
                   "give exactly one of --prompt TEXT or --prompts FILE")
    raw = common.read_prompt_records(args.prompts) if args.prompts else \
        [{"prompt": args.prompt, "_line": None}]
    by_id = {}  # id -> (item, where it was read)
    for rec in raw:
        where = f"{args.prompts}:{rec['_line']}" if rec["_line"] else "--prompt"
        given, seed = rec.get("source_image"), rec.get("seed")
        source = str(Path(args.prompts).parent / given) if given else args.source_image
        common.require(args.task != "edit" or source, f"--task edit needs a source image: "
                       f"--source-image, or a source_image field ({where}: {rec['prompt'][:60]!r})")
        common.require(seed is None or (type(seed) is int and 0 <= seed < 2 ** 63),
                       f"{where}: 'seed' must be a non-negative integer, got {seed!r}", ValueError)
        seed = prompt_seed(args.seed, rec["prompt"]) if seed is None else seed
        key = str(rec.get("id") or common.digest(rec["prompt"], given or args.source_image or "",
                                                 seed))
        item = {"id": key, "prompt": rec["prompt"], "source_image": source, "seed": seed}
        if key in by_id:
            common.require(by_id[key][0] == item, f"{where}: id {key!r} is already used by "
                           f"{by_id[key][1]} for another prompt, source or seed", ValueError)
            common.warn(f"{where} repeats {by_id[key][1]} (same prompt, source, seed): run once")
            continue
        by_id[key] = (item, where)
    return [item for item, _ in by_id.values()]


# ---- The report: pictures and summary.json ----
def contact_sheet(records: list, out: Path, path: Path) -> None:
    """First vs final image of each prompt (editing: the source first), one prompt per row."""
    cells = []
    for r in records:
        if r.get("source_image"):
            cells.append(([common.load_image(r["source_image"])],
                          ["source image", *common.wrap_text(r["prompt"], 36)[:4]]))
        n = r["selected_round"]
        for label, rnd in (("first", r["rounds"][0]),
                           (f"final (round {n}, {r['stop_reason']})", r["rounds"][n])):
            cells.append(([common.load_image(out / rnd["image"])], [
                label, f"R = {rnd['reward']:.3f}",
                *(rr.score_label(d, s, rnd.get("not_applicable", []))
                  for d, s in rnd["scores"].items()),
                *common.wrap_text(rnd["request"], 36)[:4]]))
    common.caption_grid(cells, path, columns=len(cells) // max(1, len(records)))

def save_record(rec: dict, out: Path, seconds: float) -> dict:
    """A finished prompt's sheet, then its line of gcr.jsonl (the line is what a rerun skips)."""
    rec["seconds"] = round(seconds, 2)
    contact_sheet([rec], out, out / "sheets" / f"{slug(rec['prompt'])}-{rec['id']}.png")
    common.append_jsonl(out / "gcr.jsonl", rec)
    return rec

def report(records: list, out: Path, args: Args) -> None:
    """The run's contact sheet and summary.json, the summary printed."""
    contact_sheet(records, out, out / "contact_sheet.png")
    summary = summarize(records)
    rr.warn_truncated(summary["truncated_critiques"], summary["critiques"],
                      "--scorer-max-new-tokens", args.scorer)
    common.write_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    print(f"GCR over {summary['prompts']} prompts ({out / 'gcr.jsonl'}):\n"
          + json.dumps(summary, indent=2))


# ---- main ----
def main(argv=None) -> int:
    args = common.parse(Args, argv, description=__doc__.split("\n\n")[0])
    rr.check_scorer_flags(args)
    common.require_positive(args, "rounds", "batch_size", "steps", "resolution")
    dims = rr.dimensions(args.task)
    gate = tuple(g.strip() for g in args.gate.split(",") if g.strip())
    common.require(gate and set(gate) <= set(dims), f"--gate takes {', '.join(dims)}: {args.gate}")
    common.require(1.0 <= args.threshold <= 4.0, "--threshold is a score in [1, 4]")
    weights = rr.parse_weights(args.reward_weights)
    args.generator = args.generator or common.GENERATORS[args.task]
    if args.generator == "tiny-random":
        args.steps, args.resolution = args.steps or 4, args.resolution or 64
    items, out = read_items(args), Path(args.out)
    if (out / "gcr.jsonl").is_file():  # the settings bind a folder once it holds a result
        common.check_same_run(out, args, RUN_KEYS, paths=("scorer_adapter", "prompts_dir"))
    common.start_run(out, args)
    done = {r["id"]: r for r in common.read_jsonl(out / "gcr.jsonl")}
    todo = [it for it in items if it["id"] not in done]
    if done:
        print(f"resumed: {len(items) - len(todo)} of {len(items)} prompts already finished in "
              f"{out}", file=sys.stderr)
    if todo:
        pipe = common.load_generator(args.generator, args.task, args.device, not args.t5,
                                     args.generator_quantization)
        scorer = rr.load_scorer(args, args.task, weights)
        (out / "sheets").mkdir(exist_ok=True)
        for i in tqdm(range(0, len(todo), args.batch_size), desc="GCR", unit="batch"):
            t0, batch = time.time(), todo[i:i + args.batch_size]
            for rec in run_batch(pipe, scorer, batch, args, gate, weights, out):
                done[rec["id"]] = save_record(rec, out, (time.time() - t0) / len(batch))
    report([done[it["id"]] for it in items], out, args)
    return 0

def cli() -> None:
    """The `gcr-loop` command (pyproject.toml)."""
    common.run(main)


if __name__ == "__main__":
    cli()
