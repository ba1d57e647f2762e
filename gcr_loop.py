"""Generate-Critique-Refine: the scorer's critique rewrites the request at test time.

Implements the test-time half of Sec. 2.2 of "RationalRewards: Reasoning Rewards Scale Visual
Generation Both Training and Test Time" (arXiv 2604.11626). No training: a wrapper around any
diffusers pipeline and any RationalRewards scorer.

    round 0   image_0 = G(request, seed)
    round k   critique_k = scorer(image_k | original request)   one call: scores + refined
                                                                  request
              stop if every gating dimension s_d >= threshold   (default: text faithfulness and
                                                                  physical quality >= 3.0)
              else image_{k+1} = G(refined request_k, same seed)
    select    the last image (paper) or the best reward over the rounds

The scorer always judges against the user's original request; the refined request is only
the generator's input. The seed stays fixed, so the change between rounds is the request's.

Where is (the method is one block from the top; the harness comes after it):
    the gate            ``gate_decision``, ``next_step`` (stop or refine), ``select_round``
    one GCR round       ``run_batch``: ``generate`` -> ``critique`` -> refined request
    the command line    ``Args``, ``read_items``, contact sheets, ``main``

Smoke run (CPU, offline, about 10 s on 2 cores)::

    python gcr_loop.py --generator tiny-random --scorer tiny-random \\
        --prompts prompts/gcr_demo_prompts.txt

Real run (one 24 GB GPU: SD3.5-Medium and the released scorer in 4-bit)::

    python gcr_loop.py --prompt "three red apples and the word FRESH on a crate" --out runs/gcr
    python gcr_loop.py --task edit --source-image in.png --prompt "make the sky stormy" \\
        --generator black-forest-labs/FLUX.1-Kontext-dev --generator-quantization 4bit \\
        --out runs/gcr-edit

Outputs in --out: gcr.jsonl (every round of every prompt, appended per prompt), images/,
sheets/SLUG-ID.png (first vs final per prompt; editing: the source too), contact_sheet.png (the
batch), summary.json, args.json. Rerunning into the same --out skips the prompts already finished.

Deviations from the paper:
1. `--rounds` (default 1, the paper's and the official script's setting) allows more
   refinements; `--select best` is ours (the paper keeps the last image).
2. A critique whose gating dimensions cannot be read, or that writes no refined request,
   stops refinement for that prompt (recorded as `stop_reason`) instead of failing the batch.
"""
from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

# torch is imported inside the functions that need it: at the top it would make `--help` and
# every argument error take about 3 s instead of 0.3 s (2 CPU cores).
from PIL import Image, ImageDraw

import rationalrewards as rr


STOP_REASONS = ("passed", "max_rounds", "unreadable_critique", "no_refined_request")


# ---------------------------------------------------------------------------------------
# The decision of one round (pure; unit-tested on hand-written critiques)
# ---------------------------------------------------------------------------------------
def gate_decision(critique: rr.Critique, gate: tuple, threshold: float) -> str:
    """'passed', 'refine' or 'unreadable' for one critique.

    Refine when any readable gating dimension is below the threshold (the image needs a fix,
    whatever the others say); passed when every gating dimension is readable and at least the
    threshold; unreadable otherwise (the gate cannot be decided).
    """
    scores = [critique.scores.get(d) for d in gate]
    if any(s is not None and s < threshold for s in scores):
        return "refine"
    if all(s is not None for s in scores):
        return "passed"
    return "unreadable"


def next_step(critique: rr.Critique, gate: tuple, threshold: float, refinements_done: int,
              max_rounds: int):
    """(stop_reason or None, request for the next round or None)."""
    decision = gate_decision(critique, gate, threshold)
    if decision == "passed":
        return "passed", None
    if decision == "unreadable":
        return "unreadable_critique", None
    if not critique.refined_request:
        return "no_refined_request", None
    if refinements_done >= max_rounds:
        return "max_rounds", None
    return None, critique.refined_request


def select_round(rounds: list, how: str) -> int:
    """Index of the final image: the last round, or the highest reward (the earliest on ties)."""
    if how == "last":
        return len(rounds) - 1
    return max(range(len(rounds)), key=lambda i: (rounds[i]["reward"], -i))


def summarize(records: list) -> dict:
    n = len(records)
    first = [r["rounds"][0]["reward"] for r in records]
    final = [r["rounds"][r["selected_round"]]["reward"] for r in records]
    share = lambda k: sum(k) / n if n else None
    return {
        "prompts": n,
        "share_refined": share([len(r["rounds"]) > 1 for r in records]),
        "mean_reward_first": sum(first) / n if n else None,
        "mean_reward_final": sum(final) / n if n else None,
        "share_improved": share([b > a + 1e-9 for a, b in zip(first, final)]),
        "share_worse": share([b < a - 1e-9 for a, b in zip(first, final)]),
        # critiques cut by the token limit lose their later dimensions or their refined request
        "truncated_critiques": sum(
            bool(rd.get("truncated")) for r in records for rd in r["rounds"]),
        "critiques": sum(len(r["rounds"]) for r in records),
        "stop_reasons": {k: sum(r["stop_reason"] == k for r in records)
                         for k in STOP_REASONS}
    }


# ---------------------------------------------------------------------------------------
# Generation and critique, batched across prompts
# ---------------------------------------------------------------------------------------
def generate(pipe, requests: list, seeds: list, sources: list, args: Args) -> list:
    """One pipeline call for a batch; every image from its own seeded generator."""
    import torch
    device = getattr(pipe, "_execution_device", None) or "cpu"
    accepted = inspect.signature(pipe.__call__).parameters
    kw = {"prompt": requests, "generator": [torch.Generator(device).manual_seed(s) for s in seeds]}
    if args.steps:
        kw["num_inference_steps"] = args.steps
    if args.guidance_scale is not None:
        kw["guidance_scale"] = args.guidance_scale
    if args.task == "edit":
        kw["image"] = sources
        if "strength" in accepted:  # an image-to-image pipeline rather than an instruction editor
            kw["strength"] = args.strength
        if args.resolution and "max_area" in accepted:
            # FLUX.1-Kontext: edit at this size instead of the pipeline's preferred ~1 MP resolution
            kw.update(height=args.resolution, width=args.resolution, max_area=args.resolution ** 2,
                      _auto_resize=False)
    elif args.resolution:
        kw["height"] = kw["width"] = args.resolution
    return pipe(**kw).images


def critique(scorer, images: list, request: list, sources: list, seed: int) -> list:
    """The scorer's critiques of a batch. The scorer samples (temperature > 0), so its random
    state is seeded from the batch: the same command writes the same critiques again."""
    import torch
    torch.manual_seed(seed)
    return scorer.critique(images, request, sources if scorer.task == "edit" else None)


def run_batch(pipe, scorer, items: list, args: Args, gate: tuple, weights, out: Path) -> list:
    """GCR for a batch of prompts: every round generates and critiques all prompts still
    refining."""
    sources = {
        it["id"]: rr.load_image(it["source_image"]) if it["source_image"] else None
        for it in items
    }
    bad = [it["source_image"] for it in items if it["source_image"] and sources[it["id"]] is None]
    if bad:
        raise FileNotFoundError(f"cannot read source image(s): {', '.join(bad)}")
    state = {it["id"]: {"request": it["prompt"], "rounds": [], "stop": None} for it in items}
    active = list(items)
    for round_ in range(args.rounds + 1):
        ids = [it["id"] for it in active]
        src = [sources[i] for i in ids]
        images = generate(pipe, [state[i]["request"] for i in ids], [it["seed"] for it in active],
                          src, args)
        batch_seed = int(hashlib.sha1(f"{round_}:{','.join(ids)}".encode()).hexdigest()[:8], 16)
        crits = critique(scorer, images, [it["prompt"] for it in active], src, batch_seed)
        still = []
        for it, image, c in zip(active, images, crits):
            st = state[it["id"]]
            path = out / "images" / f"{it['id']}_r{round_}.png"
            rr.save_image_atomic(image, path)
            stop, refined = next_step(c, gate, args.threshold, round_, args.rounds)
            st["rounds"].append({
                "round": round_, "request": st["request"], "image": str(path.relative_to(out)),
                "scores": c.scores, "not_applicable": c.not_applicable,
                "reward": rr.reward_from_scores(c.scores, weights), "summary": c.summary,
                "refined_request": c.refined_request, "truncated": c.truncated, "critique": c.text
            })
            if stop:
                st["stop"] = stop
            else:
                st["request"] = refined
                still.append(it)
        active = still
        if not active:
            break
    records = []
    for it in items:
        st = state[it["id"]]
        sel = select_round(st["rounds"], args.select)
        records.append({**it, "task": args.task, "rounds": st["rounds"], "stop_reason": st["stop"],
                        "selected_round": sel, "final_image": st["rounds"][sel]["image"]})
    return records



# =======================================================================================
# The method ends here. Below: the harness of the `gcr_loop` command (its flags, the prompt
# file, contact sheets, `main`).
# =======================================================================================
@dataclass
class Args(rr.ScorerArgs):
    prompt: Optional[str] = None
    """one request (or editing instruction)"""
    prompts: Optional[str] = None
    """many: .txt (one per line) or .jsonl (`prompt`, optional `source_image` and `seed`)"""
    task: Literal["t2i", "edit"] = "t2i"
    """t2i: text-to-image, three dimensions; edit: image editing, four dimensions, needs a source
    image"""
    source_image: Optional[str] = None
    """edit: the image to edit (for --prompt, or for every line of a .txt --prompts)"""
    out: str = "runs/gcr"
    """run directory; rerunning into it skips the prompts already finished"""
    generator: Optional[str] = None
    """diffusers pipeline: hub id, local directory or tiny-random (default: SD3.5-Medium for t2i,
    FLUX.1-Kontext-dev for edit)"""
    generator_quantization: Literal["none", "4bit"] = "none"
    """4bit: the generator's transformer and T5 encoder in nf4 (needs a GPU; how FLUX.1-Kontext-dev
    fits in 24 GB)"""
    no_t5: bool = False
    """SD3 generators: leave the T5 text encoder out"""
    steps: Optional[int] = None
    """denoising steps (default: the pipeline's own; 4 for tiny-random)"""
    guidance_scale: Optional[float] = None
    """classifier-free guidance (default: the pipeline's own)"""
    resolution: Optional[int] = None
    """image side in pixels, t2i and FLUX.1-Kontext edits (default: the pipeline's own; 64 for
    tiny-random)"""
    strength: float = 0.6
    """edit with an image-to-image pipeline (one that takes `strength`, not FLUX.1-Kontext): how far
    from the source"""
    threshold: float = 3.0
    """refine while any gating dimension scores below this (paper: 3.0)"""
    gate: str = "text_faithfulness,physical_quality"
    """comma-separated gating dimensions (the official script: text faithfulness and physical
    quality)"""
    rounds: int = 1
    """at most this many refinements per prompt (paper: 1)"""
    select: Literal["last", "best"] = "last"
    """final image: the last round's (paper) or the one with the highest reward"""
    batch_size: int = 4
    """prompts generated and critiqued together"""
    reward_weights: Optional[str] = None
    """per-dimension weights of the reported reward, e.g. 'image_faithfulness=0'"""
    seed: int = 0
    """base seed; each prompt's seed is derived from it and the prompt (or given in the .jsonl)"""


DEFAULT_GENERATOR = {
    "t2i": "stabilityai/stable-diffusion-3.5-medium", "edit": "black-forest-labs/FLUX.1-Kontext-dev"
}
# what the records of a run directory depend on: resuming with any of these changed is refused
RUN_KEYS = ("task", "generator", "prompts_dir", "scorer", "scorer_adapter", "scorer_api_base",
            "scorer_quantization", "scorer_max_new_tokens", "scorer_temperature", "max_pixels",
            "steps", "guidance_scale", "resolution", "strength", "threshold", "gate", "rounds",
            "select", "reward_weights", "seed")


# ---------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------
def read_items(args: Args) -> list:
    """[{id, prompt, source_image, seed}], ids from the data so that reruns find their records.

    One rule for repeats: the same (prompt, source image, seed) twice is one item, warned about and
    run once; an explicit `id` must name one item only; a seed must be an integer.
    """
    if bool(args.prompt) == bool(args.prompts):
        raise SystemExit("give exactly one of --prompt TEXT or --prompts FILE")
    if args.prompt:
        raw = [{"prompt": args.prompt, "_line": None}]
    else:
        raw = rr.read_prompt_records(args.prompts)
    items, by_id = [], {}
    for rec in raw:
        where = f"{args.prompts}:{rec['_line']}" if rec["_line"] else "--prompt"
        given_source = rec.get("source_image")
        is_path = isinstance(given_source, str) and given_source.strip()
        if given_source is not None and not is_path:
            raise ValueError(
                f"{where}: 'source_image' must be a path (a string), got {given_source!r}")
        source = given_source or args.source_image
        if source and args.prompts and given_source:
            source = str(Path(args.prompts).parent / source)  # relative to the prompts file
        if args.task == "edit" and not source:
            raise SystemExit(
                "--task edit needs a source image: --source-image, or a source_image field "
                f"({where}: {rec['prompt'][:60]!r})")
        seed = rec.get("seed")
        seed_ok = isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed < 2 ** 63
        if seed is not None and not seed_ok:
            raise ValueError(f"{where}: 'seed' must be a non-negative integer, got {seed!r}")
        if seed is None:
            seed = int(hashlib.sha1(f"{args.seed}:{rec['prompt']}".encode()).hexdigest()[:8], 16)
        if rec.get("id") is not None and not isinstance(rec["id"], (str, int)):
            raise ValueError(f"{where}: 'id' must be a string, got {rec['id']!r}")
        default_id = rr.pair_id(rec["prompt"], given_source or args.source_image or "", seed)
        key = str(rec.get("id") or default_id)
        item = {"id": key, "prompt": rec["prompt"], "source_image": source, "seed": seed}
        if key in by_id:
            first, first_where = by_id[key]
            if {k: v for k, v in first.items()} != item:
                raise ValueError(
                    f"{where}: id {key!r} is already used by {first_where} for another prompt, "
                    "source image or seed; ids must be unique")
            rr.warn(f"{where} repeats {first_where} (same prompt, source image and seed): run once")
            continue
        by_id[key] = (item, where)
        items.append(item)
    return items


# ---------------------------------------------------------------------------------------
# Contact sheets
# ---------------------------------------------------------------------------------------
def sheet_row(record: dict, out: Path, side: int = 256) -> Image.Image:
    """First vs final image of one prompt (editing: the source image first), each with its request
    and scores under it."""
    font, text_h = rr.label_font(12), 150
    panels = []
    if record.get("source_image"):
        source = rr.load_image(record["source_image"])
        if source is not None:
            panels.append(("source image", source, None))
    panels += [("first", Image.open(out / record["rounds"][0]["image"]).convert("RGB"),
                record["rounds"][0])]
    final = record["rounds"][record["selected_round"]]
    panels += [(f"final (round {record['selected_round']}, {record['stop_reason']})",
                Image.open(out / final["image"]).convert("RGB"), final)]
    row = Image.new("RGB", (len(panels) * (side + 10), side + text_h), "white")
    d = ImageDraw.Draw(row)
    for k, (label, im, rnd) in enumerate(panels):
        x = k * (side + 10)
        row.paste(rr.fit_image(im, side), (x, 0))
        lines = [label]
        if rnd is not None:
            lines += [f"R = {rnd['reward']:.3f}"]
            lines += [
                rr.score_label(dim, s, rnd.get("not_applicable", []))
                for dim, s in rnd["scores"].items()
            ]
            lines += rr.wrap_text(rnd["request"], side // 7)[:4]
        else:
            lines += rr.wrap_text(record["prompt"], side // 7)[:4]
        for j, line in enumerate(lines[:10]):
            d.text((x + 3, side + 3 + 14 * j), line, fill="black", font=font)
    return row


def contact_sheet(records: list, out: Path, path: Path) -> None:
    rows = [sheet_row(r, out) for r in records]
    sheet = Image.new("RGB", (max(r.width for r in rows), sum(r.height + 8 for r in rows)), "white")
    y = 0
    for r in rows:
        sheet.paste(r, (0, y))
        y += r.height + 8
    rr.save_image_atomic(sheet, path)


# ---------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------
def main(argv=None) -> int:
    args = rr.parse_args(Args, argv, description=__doc__.split("\n\n")[0])
    rr.set_prompts_dir(args.prompts_dir)
    rr.require_positive(args, "rounds", "batch_size", "steps", "resolution", "scorer_batch_size")
    rr.check_common_args(args)
    rr.check_writable_dir(args.out)
    gate = tuple(d.strip() for d in args.gate.split(",") if d.strip())
    unknown = [d for d in gate if d not in rr.dimensions(args.task)]
    if not gate or unknown:
        raise SystemExit(
            f"--gate takes dimensions of {args.task}: {', '.join(rr.dimensions(args.task))} (got "
            f"{args.gate!r})")
    if not 1.0 <= args.threshold <= 4.0:
        raise SystemExit("--threshold is a score in [1, 4]")
    weights = rr.parse_weights(args.reward_weights)
    args.generator = args.generator or DEFAULT_GENERATOR[args.task]
    items = read_items(args)
    out = Path(args.out)
    if (out / "gcr.jsonl").is_file():  # the settings bind a folder once it holds a result
        rr.check_same_run(out, args, RUN_KEYS, paths=("scorer_adapter",))
    rr.save_args(args, out)
    done = {r["id"]: r for r in rr.read_jsonl(out / "gcr.jsonl")}
    todo = [it for it in items if it["id"] not in done]
    if done:
        print(f"{len(items) - len(todo)} of {len(items)} prompts already finished in {out}",
              file=sys.stderr)
    if todo:
        from tqdm import tqdm
        if args.generator == "tiny-random":
            args.steps, args.resolution = args.steps or 4, args.resolution or 64
        pipe = rr.load_generator(args.generator, args.task, no_t5=args.no_t5,
                                 quantization=args.generator_quantization, device=args.device)
        scorer = rr.build_scorer(args, args.task, weights)
        (out / "images").mkdir(parents=True, exist_ok=True)
        (out / "sheets").mkdir(exist_ok=True)
        bar = tqdm(total=len(todo), desc="GCR", unit="prompt")
        for i in range(0, len(todo), args.batch_size):
            t0 = time.time()
            batch = todo[i:i + args.batch_size]
            for rec in run_batch(pipe, scorer, batch, args, gate, weights, out):
                rec["seconds"] = round((time.time() - t0) / len(batch), 2)
                sheet = out / "sheets" / f"{rr.slug(rec['prompt'])}-{rec['id']}.png"
                contact_sheet([rec], out, sheet)
                rr.append_jsonl(out / "gcr.jsonl", rec)
                done[rec["id"]] = rec
                bar.update(1)
        bar.close()
    records = [done[it["id"]] for it in items]
    contact_sheet(records, out, out / "contact_sheet.png")
    summary = summarize(records)
    rr.warn_truncated(summary["truncated_critiques"], summary["critiques"],
                      "--scorer-max-new-tokens", args.scorer)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"GCR over {summary['prompts']} prompts ({out / 'gcr.jsonl'}):")
    for k, v in summary.items():
        print(f"  {k:<20} {v:.3f}" if isinstance(v, float) else f"  {k:<20} {v}")
    return 0


def cli() -> None:
    """The `gcr-loop` command (pyproject.toml)."""
    rr.cli_entry(main)


if __name__ == "__main__":
    cli()
