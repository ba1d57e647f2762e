"""RationalRewards: the reward model that critiques before it scores.

The shared core of "RationalRewards: Reasoning Rewards Scale Visual Generation Both Training and
Test Time" (arXiv 2604.11626): the rubric and output formats of Appendix C/D, the tolerant
parsers, the reward of Sec. 2.2, the pairwise preference of Sec. 3, the scorer that
rl_nft.py and gcr_loop.py use, and the `score` / `eval` commands with the benchmarks of Table 1.

Where is (the method block runs in the order a critique is made; read ``RationalRewardsScorer``,
its last class, first: ``rewards`` is critique -> parse -> reward):
    the rubric and R    ``T2I_DIMENSIONS``, ``EDIT_DIMENSIONS``; ``reward_from_scores`` (Sec. 2.2),
                        ``preference_from_scores`` (Sec. 3)
    the prompt          prompts/*.txt (the official structure: tests/prompt_structure.json),
                        ``render_messages``
    the parser          ``parse_pointwise`` -> ``Critique``; ``parse_pairwise``; how it reads
                        markdown: ``_sections``; against the official parsers: docs/REFERENCE.md
    preference accuracy ``predict_pairs``, ``preference_metrics`` (Sec. 3); Table 1 after the banner
    the scorer          ``RationalRewardsScorer``: ``critique``, ``compare``, ``rewards``

Commands (a CPU smoke run, a real run on one GPU) and their outputs: README.md, "The reward model".

Deviations from the paper and the official code:
1. The released scorers run in 4-bit nf4 by default (the paper serves them in bf16);
   ``--scorer-quantization none`` gives bf16. Scores can move slightly under quantization.
2. The instruction sentences of the templates are ours (the structure and headers are the
   official ones); ``--prompts-dir`` runs any other wording, e.g. the official one verbatim.
3. Images are downscaled to ``--max-pixels`` before the model sees them (a memory bound).

Notation (used in comments throughout the project):
    x = (request, image[s][, source image])   y = preference label   z = rationale / critique
    s_d in [1, 4] = score of dimension d       R in [0, 1] = aggregated reward
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal, Optional

import common  # first: Ctrl-C while the libraries below import is one line, exit 130
import tyro
from PIL import Image

PROMPTS_DIR = common.PROMPTS_DIR

# Rubric of Appendix C/D, in the order the model writes the dimensions; its text (meanings, the 1-4
# scale, the output format) is in prompts/*.txt, its headers read back by `_DIMENSION_PATTERNS`.
T2I_DIMENSIONS = ("text_faithfulness", "physical_quality", "text_rendering")
EDIT_DIMENSIONS = ("text_faithfulness", "image_faithfulness", "physical_quality", "text_rendering")
DIMENSION_TITLES = {
    "text_faithfulness": "Text Faithfulness",
    "image_faithfulness": "Image Faithfulness",
    "physical_quality": "Physical and Visual Quality",
    "text_rendering": "Text Rendering",
}
RELEASED = {"t2i": "TIGER-Lab/RationalRewards-8B-T2I", "edit": "TIGER-Lab/RationalRewards-8B-Edit"}
NA_SCORE = 2.5  # a dimension that is N/A or unreadable counts as the midpoint in pairwise sums

def dimensions(task: str) -> tuple:
    if task not in ("t2i", "edit"):
        raise ValueError(f"task must be 't2i' or 'edit', got {task!r}")
    return T2I_DIMENSIONS if task == "t2i" else EDIT_DIMENSIONS


# ---- The reward (paper Sec. 2.2) and the pairwise preference (Sec. 3), from parsed scores. ----
def reward_from_scores(scores: dict, weights: Optional[dict] = None) -> float:
    """The reward R in [0, 1] of one critique, from its per-dimension scores s_d in [1, 4].

        R = (sum_d w_d * clamp(s_d, 1, 4) / sum_d w_d - 1) / 3

    over the dimensions readable and not N/A (0 when none is); w_d = 1 unless --reward-weights."""
    weights = check_weights(weights, scores)
    readable = {d: min(4.0, max(1.0, float(s))) for d, s in scores.items() if s is not None}
    total_w = sum(weights.get(d, 1.0) for d in readable)
    if not readable or total_w <= 0:
        return 0.0
    mean = sum(weights.get(d, 1.0) * s for d, s in readable.items()) / total_w
    return (mean - 1.0) / 3.0

def check_weights(weights: Optional[dict], scores: Optional[dict] = None) -> dict:
    """Per-dimension reward weights, checked: known names, finite and >= 0, not zero on every
    dimension of `scores`. Unnamed dimensions weigh 1; 0 leaves one out (image_faithfulness=0 is
    the official edit-RL reward, the mean of the other three)."""
    if not weights:
        return {}
    unknown = sorted(set(weights) - set(DIMENSION_TITLES))
    if unknown:
        raise ValueError(f"unknown reward dimension(s) {unknown}; "
                         f"known: {sorted(DIMENSION_TITLES)}")
    bad = {d: w for d, w in weights.items()
           if not (isinstance(w, (int, float)) and math.isfinite(w) and w >= 0)}
    if bad:
        raise ValueError(f"reward weights must be finite numbers >= 0, got {bad}")
    if scores and not any(weights.get(d, 1.0) > 0 for d in scores):
        raise ValueError(f"reward weights {weights} are all zero on {sorted(scores)}: "
                         "at least one dimension must count")
    return dict(weights)

def parse_weights(spec: Optional[str]) -> Optional[dict]:
    """'text_faithfulness=2,image_faithfulness=0'
    -> {'text_faithfulness': 2.0, 'image_faithfulness': 0.0}."""
    if not spec:
        return None
    try:
        weights = {k.strip(): float(v) for k, v in (item.split("=") for item in spec.split(","))}
    except ValueError:  # no "=", two of them, or not a number
        raise ValueError("reward weights look like 'text_faithfulness=1,physical_quality=0.5', "
                         f"got {spec!r}") from None
    return check_weights(weights)

def preference_from_scores(scores_a: dict, scores_b: dict) -> str:
    """'A', 'B' or 'tie' from the per-image score sums; N/A or unreadable counts 2.5."""
    keys = set(scores_a) | set(scores_b)
    sum_a = sum(NA_SCORE if scores_a.get(d) is None else float(scores_a[d]) for d in keys)
    sum_b = sum(NA_SCORE if scores_b.get(d) is None else float(scores_b[d]) for d in keys)
    if abs(sum_a - sum_b) < 1e-9:
        return "tie"
    return "A" if sum_a > sum_b else "B"


# ---- Prompts: plain-text templates in prompts/ or --prompts-dir: an optional line `[system]` and
# the system turn, then `[user]` and the user turn; `<image>` marks an image, `{name}` a field.
# What the code fills in each kind of template, and how many images it shows (edit: a source more):
TEMPLATE_FIELDS = {"pointwise": {"request"}, "pairwise": {"request"},
                   "anchored_pairwise": {"request", "preferred"},
                   "consistency": {"request", "rationale"},
                   "projection": {"request", "anchor_scores", "side", "reference"}}
TEMPLATE_IMAGES = {"pointwise": 1, "projection": 1, "pairwise": 2, "anchored_pairwise": 2,
                   "consistency": 2}
_prompts = {"dir": None, "read": {}}  # --prompts-dir, and the templates read so far

def use_prompts_dir(folder: Optional[str], kinds=(), tasks=("t2i", "edit")) -> None:
    """Templates from `folder` replace ours of the same file name; those and those of `kinds` x
    `tasks` (what the command renders) are checked at once: one error before any model loads."""
    _prompts["dir"], _prompts["read"], names = None, {}, [f"{k}_{t}" for k in kinds for t in tasks]
    if folder is not None:
        path = Path(folder).expanduser()
        common.require(path.is_dir(), f"--prompts-dir {folder} is not a folder")
        known = {f"{kind}_{task}" for kind in TEMPLATE_FIELDS for task in ("t2i", "edit")}
        files = sorted(p.stem for p in path.glob("*.txt"))
        unknown = sorted(set(files) - known)
        common.require(files and not unknown, f"--prompts-dir {folder}: "
                       + (f"{', '.join(unknown)}.txt replace no template of ours" if unknown
                          else "no .txt templates") + f" (names: {', '.join(sorted(known))})")
        _prompts["dir"], names = path, files + names
    for name in names:
        load_prompt(name)

def load_prompt(name: str) -> tuple:
    """(system turn or None, user turn) of template `name`, checked: the fields the code fills and
    the image slots it fills are all there (a missing one is a ValueError naming the file)."""
    if name in _prompts["read"]:
        return _prompts["read"][name]
    path = PROMPTS_DIR / f"{name}.txt"
    if _prompts["dir"] and (_prompts["dir"] / f"{name}.txt").is_file():
        path = _prompts["dir"] / f"{name}.txt"
    if not path.is_file():
        known = sorted(p.stem for p in PROMPTS_DIR.glob("*.txt"))
        raise FileNotFoundError(f"prompt template {path} not found (known: {known})")
    text, system = common.read_text_file(path), None
    if text.lstrip().startswith("[system]"):
        body = text.lstrip()[len("[system]"):]
        m = re.search(r"^\[user\][ \t]*$", body, re.M)
        if not m:
            raise ValueError(f"template {path} opens with [system] but has no [user] line")
        system, text = body[:m.start()].strip("\n"), body[m.end():].lstrip("\n")
    kind, task = name.rsplit("_", 1)
    if kind in TEMPLATE_FIELDS:
        found = set(re.findall(r"\{([a-z_]+)\}", (system or "") + text))
        missing, extra = TEMPLATE_FIELDS[kind] - found, found - TEMPLATE_FIELDS[kind]
        slots, want = text.count("<image>"), TEMPLATE_IMAGES[kind] + (task == "edit")
        if missing or extra or slots != want:
            why = [f"lacks {{{f}}}" for f in sorted(missing)]
            why += [f"has {{{f}}}, which the code never fills" for f in sorted(extra)]
            why += [f"has {slots} <image> slots in its user turn, not {want}"] if slots != want \
                else []
            raise ValueError(f"template {path} {', '.join(why)}")
    _prompts["read"][name] = (system, text)
    return system, text

def fill_prompt(name: str, **fields) -> tuple:
    """(system turn or None, user turn), filled in one pass; a field's "<image>" is [image]."""
    turns = list(load_prompt(name))
    missing = set(re.findall(r"\{([a-z_]+)\}", "".join(t or "" for t in turns))) - set(fields)
    if missing:
        raise ValueError(f"prompt {name!r} needs fields {sorted(missing)}")
    values = {k: str(v).replace("<image>", "[image]") for k, v in fields.items()}
    turns = [t and re.sub(r"\{([a-z_]+)\}", lambda m: values.get(m[1], m[0]), t) for t in turns]
    return tuple(turns)

def render_messages(name: str, images: list, sources: int = 0, **fields) -> list:
    """Template + images + fields -> [system turn,] user turn in the transformers chat format, the
    images at the template's `<image>` marks in order. sources > 1: the first mark (the source's)
    holds that many source images, and the text says how many there are and in which order."""
    system, text = fill_prompt(name, **fields)
    if sources > 1:
        slots = "\n".join(f"Source image {i + 1} of {sources}: <image>" for i in range(sources))
        note = f"({sources} source images, in order; the instruction refers to them by position)"
        text = text.replace("<image>", f"{note}\n{slots}", 1)
    user = [{"role": "user", "content": to_content(text, images, name)}]
    return ([{"role": "system", "content": system}] if system else []) + user

def to_content(text: str, images: list, what: str = "text") -> list:
    """Text with `<image>` markers + images -> a chat content list with the images in place."""
    pieces = text.split("<image>")
    if len(pieces) - 1 != len(images):
        raise ValueError(f"{what!r} has {len(pieces) - 1} image slots, got {len(images)} images")
    content = []
    for i, piece in enumerate(pieces):
        content += [{"type": "text", "text": piece}] if piece.strip() else []
        content += [{"type": "image", "image": images[i]}] if i < len(images) else []
    return content


# ---- Reading the critique back: the parsed forms, then how the markdown is read (tolerantly) ----
@dataclass
class Critique:
    """A parsed pointwise critique (Appendix C/D). A score is None when N/A or unreadable."""
    scores: dict
    justifications: dict
    not_applicable: list
    summary: Optional[str]
    refinement_comments: Optional[str]
    refined_request: Optional[str]
    text: str
    truncated: bool = False        # generation stopped by the token limit, not by the model
    error: Optional[str] = None    # the request failed (HTTP error after retries): no reply at all
    complete: bool = True          # every dimension has its Score line (N/A counts as one)

    @property
    def readable(self) -> bool:
        return any(v is not None for v in self.scores.values())

@dataclass
class PairwiseJudgement:
    """A parsed pairwise judgement. `preferred` follows the score sums, None when unreadable."""
    scores_a: dict
    scores_b: dict
    winners: dict
    justifications: dict
    summary: Optional[str]
    preferred: Optional[str]
    text: str
    truncated: bool = False
    error: Optional[str] = None
    complete: bool = True          # every dimension has its Score A and Score B lines

def parse_pointwise(text: str, task: str = "t2i") -> Critique:
    dims = dimensions(task)
    per_dim, sections = _sections(text, dims)
    scores, justs, na = {}, {}, []
    for d in dims:
        raw = per_dim.get(d, {})
        s = parse_score(raw["score"]) if "score" in raw else None
        if s == "N/A":
            na.append(d)
            s = None
        scores[d], justs[d] = s, raw.get("justification")
    refined = (sections.get("refined request") or "").strip()
    # a request wrapped in quotes as a whole, not one ending in a quoted word
    if len(refined) > 1 and refined[0] in '"“' and refined[-1] in '"”':
        refined = refined[1:-1].strip()
    complete = all("score" in per_dim.get(d, {}) for d in dims)
    return Critique(scores, justs, na, sections.get("summary") or None,
                    sections.get("refinement comments") or None, refined or None, text,
                    complete=complete)

def parse_pairwise(text: str, task: str = "t2i") -> PairwiseJudgement:
    dims = dimensions(task)
    per_dim, sections = _sections(text, dims)
    scores_a, scores_b, winners, justs = {}, {}, {}, {}
    for d in dims:
        raw = per_dim.get(d, {})
        for out, key in ((scores_a, "score_a"), (scores_b, "score_b")):
            s = parse_score(raw[key]) if key in raw else None
            out[d] = None if s == "N/A" else s
        winners[d] = _parse_winner(raw["winner"]) if "winner" in raw else None
        justs[d] = raw.get("justification")
    readable = any(v is not None for v in list(scores_a.values()) + list(scores_b.values()))
    preferred = preference_from_scores(scores_a, scores_b) if readable else None
    complete = all({"score_a", "score_b"} <= set(per_dim.get(d, {})) for d in dims)
    return PairwiseJudgement(scores_a, scores_b, winners, justs, sections.get("summary") or None,
                             preferred, text, complete=complete)


# The model writes markdown; we read it back tolerantly: bold markers, `3.5/4`, `[3.5]`, N/A,
# sections missing or out of order, a reasoning preamble. Unreadable -> None.
_S = r"[\s_/&-]*"  # what may stand between the words of a dimension's name
# First key wins, so specific names come before "quality"; within a key long names come first, so
# that a header line holding only "Physical and Visual Quality" is read as exactly a title.
_DIMENSION_PATTERNS = [
    ("text_rendering", rf"text{_S}rendering|typography"),
    ("image_faithfulness",
     rf"image{_S}(?:faithfulness|consistency|preservation)|"
     rf"(?:source|input){_S}(?:image{_S})?(?:faithfulness|consistency|preservation)"),
    ("text_faithfulness",
     rf"text{_S}(?:faithfulness|alignment|fidelity)|"
     rf"(?:instruction|prompt){_S}(?:following|faithfulness|alignment)"),
    ("physical_quality",
     rf"physical{_S}(?:and{_S})?visual{_S}quality|physical{_S}(?:quality|plausibility)|"
     rf"visual{_S}quality|image{_S}quality|physical|(?:overall{_S})?quality"),
]
_FIELD_RE = re.compile(r"^[\s#>*_-]*"
                       r"(justification|score\s*(?:for\s*)?(?:image\s*)?[ab]|score|winner)"
                       r"\s*[:：]\s*(.*)$", re.I)
_HEADER_RE = re.compile(r"^[\s>*_]*(#*)\s*(?:(\d+)\s*[.):]\s*)?(.*?)\s*$")
_SECTION_RE = re.compile(r"^[\s>*_]*#*\s*"
                         r"(summary|user request refinement|refinement comments|refined request|"
                         r"user request analysis|detailed judgements?)\s*[:：]?\s*(.*)$", re.I)

def parse_score(value: str):
    """'3.5', '**3.5**', '[3.5]', '3.5/4', 'Score: 3' -> float clamped to [1, 4];
    'N/A' -> 'N/A'; anything else -> None."""
    v = value.strip().strip("*_[]()`'\" ").strip()
    if re.match(r"^(n\s*/?\s*a\b|not\s+applicable|none\b)", v, re.I):
        return "N/A"
    m = re.search(r"[-+]?\d+(?:\.\d+)?", v)
    if not m:
        return None
    return min(4.0, max(1.0, float(m.group())))

def _parse_winner(value: str) -> Optional[str]:
    v = value.strip().strip("*_[]`'\" ").lower()
    if re.search(r"\btie\b|\bequal|\bboth\b", v):
        return "tie"
    m = re.match(r"^(?:image\s*|edit\s*)?([ab])\b", v)
    return m.group(1).upper() if m else None

def _classify_header(line: str, dims: tuple) -> Optional[str]:
    """Dimension key if `line` starts a dimension section, else None. A header is `1. Title`,
    `## Title` (a short tail allowed) or a line holding only the title, so neither a sentence like
    "Text rendering is fine." nor a numbered item in a justification ("1. The hand has six
    fingers.") starts a new section."""
    m = _HEADER_RE.match(line.replace("**", ""))
    hashes, number, title = m.group(1), m.group(2), m.group(3)
    for key, pattern in _DIMENSION_PATTERNS:
        hit = re.match(rf"({pattern})\b", title, re.I)
        if hit and key in dims:
            rest = title[hit.end():].strip(" :：-")
            if number or hashes:  # "2. Physical Quality (hands, light):" may carry a short tail
                is_header = len(rest) < 25
            else:                 # a bare title line: nothing after it but a parenthesis
                is_header = not rest or rest.startswith("(")
            if is_header:
                return key
    numbered_title = number and 1 <= int(number) <= len(dims) and title.endswith((":", "："))
    if numbered_title and len(title.split()) <= 6:
        return dims[int(number) - 1]  # a numbered "Title:" we do not know: trust the number
    return None

def _sections(text: str, dims: tuple):
    """Split a critique into {dimension: {field: text}} plus {section: text}.

    For example (t2i), the text
        1. Text Faithfulness
        ## Justification: The cat is red.
        ## Score: 3
        Summary: Good overall.
    becomes
        ({"text_faithfulness": {"justification": "The cat is red.", "score": "3"}},
         {"summary": "Good overall."})
    A line that is no header and no field continues the field (or section) above it.
    """
    if "</think>" in text:  # a reasoning model's preamble
        text = text.rsplit("</think>", 1)[1]
    per_dim, sections = {}, {}
    target = None  # the dict and key the current line's continuation is appended to
    dim = None
    for raw in text.splitlines():
        line = raw.replace("**", "").replace("__", "")
        sec = _SECTION_RE.match(line)
        fld = _FIELD_RE.match(line)
        if sec and not fld:
            name = sec.group(1).lower()
            dim = None
            sections[name] = sec.group(2).strip()
            target = (sections, name)
        elif fld and (dim is not None
                      or (fld.group(1).lower().startswith("score") and not per_dim)):
            if dim is None:  # scores with no header at all: the first dimension
                dim = dims[0]
                per_dim.setdefault(dim, {})
            name = re.sub(r"\s+", " ", fld.group(1).lower())
            if name.startswith("score") and name[-1] in "ab":  # "score for image a" -> score_a
                name = "score_" + name[-1]
            if name.startswith("score"):  # the last parseable Score line (the RL parser's rule)
                if name not in per_dim[dim] or parse_score(fld.group(2)) is not None:
                    per_dim[dim][name] = fld.group(2).strip()
            else:
                per_dim[dim].setdefault(name, fld.group(2).strip())
            target = (per_dim[dim], name)
        elif (key := _classify_header(line, dims)) is not None and not fld:
            dim = key
            per_dim.setdefault(dim, {})
            target = None
        elif target is not None and line.strip():
            d, k = target
            d[k] = (d[k] + "\n" + line.strip()).strip()
    return per_dim, sections


# ---- Preference evaluation (paper Sec. 3): a batch of pairs -> predictions -> accuracy. ----
def predict_pairs(scorer: RationalRewardsScorer, batch: list, mode: str) -> list:
    """One prediction record per (pair, images) in `batch`; a failed request's is `failed`."""
    a, b = [im["image_a"] for _, im in batch], [im["image_b"] for _, im in batch]
    reqs = [p["prompt"] for p, _ in batch]
    src = [im["source_image"] for _, im in batch] if scorer.task == "edit" else None
    if mode == "pointwise":  # both images of every pair in one batched critique call
        crits = scorer.critique(a + b, reqs * 2, src * 2 if src else None, allow_failures=True)
        sides = [[ca, cb] for ca, cb in zip(crits[:len(batch)], crits[len(batch):])]
    else:
        sides = [[j] for j in scorer.compare(a, b, reqs, src, allow_failures=True)]
    return [prediction(p, replies, scorer.task) for (p, _), replies in zip(batch, sides)]

def prediction(pair: dict, replies: list, task: str) -> dict:
    """The record of one pair from its replies: [Critique of A, Critique of B] (pointwise) or
    [PairwiseJudgement]."""
    texts, error = [r.text for r in replies], next((r.error for r in replies if r.error), None)
    # the official scripts' rules (docs/REFERENCE.md, Table 1). No reply, or "" with HTTP 200: the
    # pair is left out (`success = False`), counted, and retried by the next run
    if not error and not all(t.strip() for t in texts):
        error = "empty reply"
    if error:
        return {"id": pair["id"], "label": pair["label"], "failed": True, "error": error}
    record = {"id": pair["id"], "label": pair["label"],
              "truncated": sum(int(r.truncated) for r in replies), "outputs": texts}
    # edit: a dimension without its Score lines makes the official parsers raise (the pair is left
    # out); ours counts it as `unparsed`, never judged on partial scores
    if task == "edit" and not all(r.complete for r in replies):
        return {**record, "unparsed": True}
    if len(replies) == 2:
        sa, sb, ok = replies[0].scores, replies[1].scores, all(r.readable for r in replies)
    else:
        sa, sb, ok = replies[0].scores_a, replies[0].scores_b, replies[0].preferred is not None
    # t2i: an unreadable dimension counts 2.5 (the official fallback), so a wholly unreadable side
    # loses to any score above 2.5
    return {**record, "scores_a": sa, "scores_b": sb, "predicted": preference_from_scores(sa, sb),
            "unreadable": not ok}

def dimension_means(scores: list, dims: tuple = T2I_DIMENSIONS) -> dict:
    """{dimension: mean of its readable scores over `scores` (a list of score dicts), or None}."""
    out = {}
    for d in dims:
        vals = [s[d] for s in scores if s.get(d) is not None]
        out[d] = sum(vals) / len(vals) if vals else None
    return out

def preference_metrics(records: list, task: str) -> dict:
    """Metrics over prediction records (one per pair; failed requests are counted, not scored).
    accuracy_with_ties: over every labelled pair, a tie label right only when the sums are equal;
    accuracy_without_ties: over A/B labels only, a predicted tie wrong (the official
    compute_pairwise_accuracy.py's protocol once tie votes carry no label)."""
    failed = [r for r in records if r.get("failed")]
    unparsed = [r for r in records if r.get("unparsed")]
    scored = [r for r in records if not r.get("failed") and not r.get("unparsed")]
    correct = [r["predicted"] == r["label"] for r in scored]
    no_tie = [c for c, r in zip(correct, scored) if r["label"] != "tie"]
    dim_means = dimension_means([r[side] for r in scored for side in ("scores_a", "scores_b")],
                                dimensions(task))
    return {"pairs": len(scored),
            "accuracy_with_ties": sum(correct) / len(correct) if correct else None,
            "accuracy_without_ties": sum(no_tie) / len(no_tie) if no_tie else None,
            "correct_with_ties": sum(correct), "correct_without_ties": sum(no_tie),
            "ab_labelled": len(no_tie), "tie_labels": len(scored) - len(no_tie),
            "unreadable_outputs": sum(r["unreadable"] for r in scored),
            "predicted_ties": sum(r["predicted"] == "tie" for r in scored),
            "outputs": sum(len(r.get("outputs") or [None]) for r in scored + unparsed),
            "truncated_outputs": sum(r.get("truncated", 0) for r in scored + unparsed),
            "failed": len(failed), "unparsed": len(unparsed), "mean_scores": dim_means}


# ---- The scorer (paper Sec. 2.2): critique -> parse -> reward. `rewards`, last, is the driver ----
class RationalRewardsScorer:
    """The reward model as the method uses it: `critique()` (GCR reads it), `compare()` (the
    pairwise judge of Table 1) and `rewards()`, the RL reward."""

    def __init__(self, backend, task: str = "t2i", max_new_tokens: int = 2048,
                 temperature: float = 0.1, weights: Optional[dict] = None):
        dimensions(task)
        self.backend, self.task, self.weights = backend, task, weights
        self.max_new_tokens, self.temperature = max_new_tokens, temperature

    def _ask(self, kind: str, images: list, requests: list, sources, allow_failures: bool) -> list:
        """One parsed reply per request to the `kind` template; images[i]: request i's judged
        images, after its source image(s) for an edit (MMRB2 edits have 2-3, in order). A failed
        request raises BackendError unless allow_failures (eval leaves it out and counts it)."""
        sources = source_lists(sources, len(images)) if self.task == "edit" else [[]] * len(images)
        msgs = [render_messages(f"{kind}_{self.task}", [*src, *ims], request=r, sources=len(src))
                for ims, src, r in zip(images, sources, requests)]
        outs = common.generations(self.backend.generate(msgs, self.max_new_tokens,
                                                        self.temperature))
        failed = [o.error for o in outs if o.error]
        if failed and not allow_failures:
            raise common.BackendError(failed[0])
        parse = parse_pointwise if kind == "pointwise" else parse_pairwise
        return [dataclasses.replace(parse(o.text, self.task), truncated=o.truncated,
                                    error=o.error) for o in outs]

    def compare(self, images_a, images_b, requests, source_images=None,
                allow_failures: bool = False) -> list:
        """[PairwiseJudgement]: both images of each pair in one prompt."""
        pairs = [list(ab) for ab in zip(as_images(images_a), as_images(images_b))]
        return self._ask("pairwise", pairs, requests, source_images, allow_failures)

    def critique(self, images, requests, source_images=None, allow_failures: bool = False) -> list:
        """[Critique]: each image alone against its request (scores, summary, refined request)."""
        return self._ask("pointwise", [[im] for im in as_images(images)], requests,
                         source_images, allow_failures)

    def rewards(self, images, requests, source_images=None) -> list:
        """The reward of each image, as RL uses it: critique it, parse the scores s_d, then
        R = (mean_d clamp(s_d, 1, 4) - 1) / 3 over the readable dimensions (reward_from_scores)."""
        return [reward_from_scores(c.scores, self.weights)
                for c in self.critique(images, requests, source_images)]


# =======================================================================================
# The method ends here. Below: the `score` and `eval` commands (their flags, the resumable
# evaluation of a pairs file, the benchmarks of Table 1). Plumbing is in common.py.
# =======================================================================================
@dataclass
class ScorerFlags:
    """The scorer's flags, the same in every command that scores (score, eval, rl_nft, gcr_loop)."""
    scorer: Optional[str] = common.default_text("the released checkpoint for --task")
    """hub id, local folder or tiny-random; with --scorer-api-base the served name; toy-redness /
    toy-blueness: a demonstration critic (common.ToyCritic), not a reward model"""
    scorer_adapter: Optional[str] = None
    """LoRA adapter folder on top of --scorer, e.g. the PARROT student (runs/X/student)"""
    scorer_api_base: Optional[str] = None
    """OpenAI-compatible endpoint serving the scorer, e.g. http://localhost:8000/v1 (vLLM, SGLang;
    key: OPENAI_API_KEY), instead of loading it"""
    scorer_quantization: Literal["auto", "4bit", "8bit", "none"] = "auto"
    """auto = 4-bit nf4 on a GPU, none on CPU"""
    scorer_batch_size: int = 8
    """critiques per generate() call, or requests in flight over HTTP"""
    scorer_max_new_tokens: Optional[int] = common.default_text(
        "2048, the paper's; tiny-random 64; eval --benchmark over HTTP 20480, the official one")
    """longest critique"""
    scorer_temperature: float = 0.1
    """sampling temperature (paper: 0.1); 0 means greedy"""
    max_pixels: int = 768 * 768
    """images are downscaled to at most this many pixels before the scorer sees them"""
    prompts_dir: Optional[str] = None
    """a folder of templates named as in prompts/ (e.g. the official wording) that replace ours"""


# --help order: a command's inputs, the scorer's flags, its own (dataclass fields: bases reversed)
@dataclass
class _ScoreInputs:
    prompt: str
    """the generation request (or editing instruction)"""
    image: Annotated[list, tyro.conf.UseAppendAction] = dataclasses.field(default_factory=list)
    """an image file to judge against --prompt (repeat the flag for more)"""
    source_image: Optional[str] = None
    """--task edit: the image that was edited"""
    task: Literal["t2i", "edit"] = "t2i"
    """t2i: three dimensions; edit: four (adds image faithfulness), needs --source-image"""

@dataclass
class ScoreArgs(ScorerFlags, _ScoreInputs):
    """Critique and score images against a request."""
    json: bool = False
    """print one JSON object instead of the readable report"""
    device: Optional[str] = common.default_text("cuda when there is a GPU")
    """cuda, cuda:1, cpu"""
    seed: int = 0
    """seed for sampling"""

@dataclass
class _EvalInputs:
    pairs: Optional[str] = None
    """JSONL of pairs: prompt, image_a, image_b, label (A/B/tie), optional source_image and id"""
    benchmark: Optional[Literal["genai-bench-t2i", "genai-bench-edit", "editreward-bench",
                                "mmrb2-t2i", "mmrb2-edit"]] = None
    """a benchmark of Table 1 instead of --pairs (its task, labels and protocol follow it)"""
    data_dir: Optional[str] = None
    """--benchmark: a local copy (a parquet file or a folder of them) instead of the hub"""
    task: Literal["t2i", "edit"] = "t2i"
    """--pairs: t2i (three dimensions) or edit (four; every pair needs a source_image)"""
    mode: Optional[Literal["pointwise", "pairwise"]] = common.default_text(
        "--pairs pointwise, --benchmark pairwise, as the paper evaluates")
    """pointwise: each image alone; pairwise: both at once"""
    limit: Optional[int] = common.default_text("all")
    """use only the first N pairs"""

@dataclass
class EvalArgs(ScorerFlags, _EvalInputs):
    """Preference accuracy on a file of pairs, or on a benchmark of the paper's Table 1."""
    out: Optional[str] = common.default_text("none for --pairs, runs/NAME for --benchmark")
    """folder for predictions.jsonl (resumable), metrics.json and args.json"""
    device: Optional[str] = common.default_text("cuda when there is a GPU")
    """cuda, cuda:1, cpu"""
    seed: int = 0
    """seed for sampling"""

def as_images(items) -> list:
    """PIL images, or paths to open; anything else is a TypeError that says what is accepted."""
    out = []
    for x in items:
        if isinstance(x, (str, os.PathLike)):
            path, (x, problem) = x, common.read_image(x)
            common.require(x is not None, f"image {path}: {problem}", FileNotFoundError)
        if not isinstance(x, Image.Image):
            raise TypeError("images are PIL.Image.Image objects or paths (str or pathlib.Path), "
                            f"got {type(x).__name__}")
        out.append(x.convert("RGB") if x.mode != "RGB" else x)
    return out

def source_lists(sources, n: int) -> list:
    """An edit's source images, one image or a list of them per edited image, as lists of images."""
    common.require(sources is not None and len(sources) == n, "task 'edit' needs one source image "
                   "(or a list of them) per edited image", ValueError)
    lists = [as_images(s if isinstance(s, (list, tuple)) else [s]) for s in sources]
    common.require(all(lists), "an edit needs at least one source image", ValueError)
    return lists


OFFICIAL_MAX_TOKENS = 20480  # the official evaluation scripts' max_tokens
TINY_MAX_NEW_TOKENS = 64     # tiny-random writes noise to any limit: smoke runs stop it early

def check_scorer_flags(args) -> None:
    common.check_device(args.device)
    use_prompts_dir(args.prompts_dir, ("pointwise", "pairwise"))
    common.require_positive(args, *[k for k in ("scorer_batch_size", "max_pixels",
                                                "scorer_max_new_tokens", "limit")
                                    if hasattr(args, k)])

def load_scorer(args: ScorerFlags, task: str, weights: Optional[dict] = None) -> \
        RationalRewardsScorer:
    """The scorer of the --scorer* flags, in every command."""
    model = args.scorer or RELEASED[task]
    tokens = args.scorer_max_new_tokens or (TINY_MAX_NEW_TOKENS if model == "tiny-random" else 2048)
    backend = common.load_backend(model, args.scorer_api_base, args.scorer_adapter,
                                  args.scorer_quantization, args.scorer_batch_size,
                                  args.max_pixels, args.device)
    return RationalRewardsScorer(backend, task, tokens, args.scorer_temperature, weights)

def warn_truncated(truncated: int, total: int, flag: str, model: Optional[str] = None) -> None:
    """Warn when over 1% of outputs were cut by the token limit (not for tiny-random's noise)."""
    if model != "tiny-random" and total and truncated / total > 0.01:
        common.warn(f"{truncated} of {total} outputs ({100 * truncated / total:.1f}%) were cut by "
                    f"the token limit before the model finished; raise {flag}")

def score_label(dim: str, score, not_applicable=()) -> str:
    """How every picture writes one score: the number, N/A (the critique said so) or unreadable."""
    value = f"{score:.1f}" if score is not None else \
        "N/A" if dim in not_applicable else "unreadable"
    return f"{DIMENSION_TITLES[dim]}: {value}"

def read_pairs(path, limit: Optional[int] = None) -> list:
    """Pairs from our JSONL format (image paths relative to the file); ids from the record as
    written, so the same file named by another path resumes the same run."""
    path, pairs = Path(path), []
    if not path.is_file():
        raise FileNotFoundError(f"pairs file {path} not found")
    for n, line in enumerate(common.read_text_file(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            item = {"prompt": rec["prompt"],
                    "label": {"a": "A", "b": "B", "tie": "tie"}[str(rec["label"]).strip().lower()],
                    **{k: str(path.parent / rec[k]) for k in ("image_a", "image_b", "source_image")
                       if rec.get(k)}}
            item["id"] = str(rec.get("id") or common.digest(
                rec["prompt"], rec["image_a"], rec["image_b"], rec.get("source_image") or ""))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"{path}:{n}: expected prompt, image_a, image_b, label (A/B/tie): "
                             f"{err!r}") from None
        pairs.append(item)
        if limit is not None and len(pairs) >= limit:
            break
    return pairs

def evaluate_preferences(scorer: RationalRewardsScorer, pairs: list, mode: str = "pointwise",
                         out_dir: Optional[str] = None, batch_size: int = 8) -> dict:
    """Predict every pair, append each prediction to out_dir/predictions.jsonl, return the metrics
    over exactly `pairs`. A rerun into out_dir skips the pairs predicted and retries the failed."""
    from tqdm import tqdm
    pred_path = Path(out_dir) / "predictions.jsonl" if out_dir else None
    if pred_path:
        pred_path.parent.mkdir(parents=True, exist_ok=True)
    latest = {r["id"]: r for r in (common.read_jsonl(pred_path) if pred_path else [])}
    todo = [p for p in pairs if p["id"] not in latest or latest[p["id"]].get("failed")]
    skipped = {"missing": 0, "unreadable": 0}
    if len(todo) < len(pairs):
        print(f"resumed: {len(pairs) - len(todo)} of {len(pairs)} pairs already predicted in "
              f"{out_dir}", file=sys.stderr)
    bar = tqdm(total=len(todo), desc=f"eval ({mode})", unit="pair", disable=not todo)
    for i in range(0, len(todo), batch_size):
        batch = []
        for p in todo[i:i + batch_size]:
            # an edit has one source image, or several (MMRB2 `source_images`), sent in order
            files = [p["image_a"], p["image_b"],
                     *(p.get("source_images") or [p[k] for k in ["source_image"] if p.get(k)])]
            read = [common.read_image(f) for f in files]
            bad = {f: problem for f, (_, problem) in zip(files, read) if problem}
            if scorer.task == "edit" and len(files) < 3:
                bad["source_image"] = "missing (an edit pair needs one)"
            if bad:
                missing = all(v.startswith("missing") for v in bad.values())
                skipped["missing" if missing else "unreadable"] += 1
                common.warn(f"skipping pair {p['id']}: "
                            + "; ".join(f"{f}: {v}" for f, v in bad.items()))
                continue
            ims = [im for im, _ in read]
            batch.append((p, {"image_a": ims[0], "image_b": ims[1], "source_image": ims[2:]}))
        for rec in predict_pairs(scorer, batch, mode) if batch else []:
            latest[rec["id"]] = rec
            if pred_path:
                common.append_jsonl(pred_path, rec)
            if rec.get("failed"):
                common.warn(f"pair {rec['id']}: the request failed ({rec['error'][:200]}); left "
                            "out, and retried by the next run into the same --out")
        bar.update(len(todo[i:i + batch_size]))
        done = [latest[q["id"]] for q in pairs if q["id"] in latest]
        acc = preference_metrics(done, scorer.task)["accuracy_with_ties"]
        bar.set_postfix(acc=f"{acc or 0:.3f}")
    bar.close()
    records = [latest[p["id"]] for p in pairs if p["id"] in latest]  # exactly the pairs asked for
    metrics = {**preference_metrics(records, scorer.task), "skipped_pairs": sum(skipped.values()),
               "skipped_missing_image": skipped["missing"],
               "skipped_unreadable_image": skipped["unreadable"], "mode": mode}
    warn_truncated(metrics["truncated_outputs"], metrics["outputs"],
                   "--scorer-max-new-tokens (parrot: --max-new-tokens)",
                   getattr(scorer.backend, "name", None))
    if out_dir:
        common.write_atomic(Path(out_dir) / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    return metrics


# ---- The paper's Table 1: each benchmark with its official labels and protocol ----
# Each row streams from the hub (or --data-dir) and becomes one of our pairs (A = left /
# candidate_1), counted as the official code behind the paper's figure counts it (`protocol`; the
# files, and why not modular_rm_eval/: docs/REFERENCE.md, Table 1).
BENCHMARKS = {
    "genai-bench-t2i": dict(hub="TIGER-Lab/GenAI-Bench", config="image_generation", split="test",
                            task="t2i", prompt="prompt", a="left_image", b="right_image", src=None,
                            label="vote_type", paper=69.8,
                            protocol="A/B votes only (tie and both-bad votes skipped), a predicted "
                            "tie is wrong (rm_inference/inference_genaibench_imggen.py, "
                            "compute_pairwise_accuracy.py)"),
    "genai-bench-edit": dict(hub="TIGER-Lab/GenAI-Bench", config="image_edition", split="test",
                             task="edit", prompt="instruct_prompt", a="left_output_image",
                             b="right_output_image", src="source_image", label="vote_type",
                             paper=80.1, protocol="A/B votes only, a predicted tie is wrong, "
                             "unparsed replies left out "
                             "(rm_inference/inference_genaibench_imgedit.py)"),
    "editreward-bench": dict(hub="TIGER-Lab/EditReward-Bench", config=None, split="train",
                             task="edit", prompt="instruction", a="candidate_1", b="candidate_2",
                             src="source_image", label="ranking", paper=66.2,
                             protocol="every comparison, ties A=B included "
                             "(EditReward/evaluate/eval_bench.py)"),
    # MMRB2's pairs are built by facebookresearch/MMRB2 from facebook/MMRB2_image; read locally
    "mmrb2-t2i": dict(hub=None, config=None, split="train", task="t2i", prompt="prompt_text",
                      a="response_a_images", b="response_b_images", src=None, label="chosen",
                      paper=64.2,
                      protocol="every labelled pair (rm_inference/inference_mmrb2_imggen.py)"),
    "mmrb2-edit": dict(hub=None, config=None, split="train", task="edit", prompt="prompt_text",
                       a="response_a_images", b="response_b_images", src="prompt_images",
                       label="chosen", paper=70.3, protocol="every labelled pair, all source "
                       "images sent, unparsed replies left out "
                       "(rm_inference/inference_mmrb2_imgedit.py)"),
}
MMRB2_HINT = ("needs pairs built with facebookresearch/MMRB2 (images from facebook/MMRB2_image): "
              "parquet with pair_id, prompt_text, prompt_images, response_a_images, "
              "response_b_images, chosen; pass --data-dir")
# compute_pairwise_accuracy.py's _normalize_chosen
CHOSEN = {**dict.fromkeys(("a", "left", "leftvote", "1", "model_1"), "A"),
          **dict.fromkeys(("b", "right", "rightvote", "2", "model_2"), "B"),
          **dict.fromkeys(("tie", "draw", "equal", "a=b"), "tie")}

def benchmark_label(name: str, row: dict) -> Optional[str]:
    """'A', 'B' or 'tie' for one benchmark row; None when it carries no usable label."""
    if name.startswith("genai-bench"):  # tie and both-bad votes: "tie" (left out by the protocol)
        vote = str(row.get("vote_type") or "").strip().lower()
        return {"leftvote": "A", "rightvote": "B"}.get(vote, "tie") if vote else None
    if name == "editreward-bench":
        return editreward_label(row.get("ranking"), row.get("comparison_type"))
    return CHOSEN.get(str(row.get("chosen") or "").strip().lower())

def editreward_label(ranking, comparison_type) -> Optional[str]:
    """EditReward-Bench: which of candidate_1 (A) and candidate_2 (B) humans ranked higher.

    `comparison_type` names the two letters compared ("AvsC": candidate_1 is A, candidate_2 C);
    the ranking is pairwise or full ("C>A", "C>A>B": the letter written first wins, as
    eval_bench.py's get_pairwise_gt reads it) or a 2-way tie ("A=B=Good"). Without it the row is a
    2-way sample: its pair is the ranking's two letters, in alphabetical order."""
    ranking = str(ranking or "").replace(" ", "")
    if ranking in ("A=B=Good", "A=B=Bad") or re.fullmatch(r"[A-Z]=[A-Z]", ranking):
        return "tie"
    letters = re.findall(r"[A-Z]", ranking)
    if len(letters) != len(set(letters)) or not re.fullmatch(r"[A-Z](>[A-Z])+", ranking):
        return None
    left, _, right = str(comparison_type or "").partition("vs")
    if not (left and right):
        if len(letters) != 2:
            return None  # a 3- or 4-way ranking says nothing about which pair the row holds
        left, right = sorted(letters)
    if left not in letters or right not in letters:
        return None
    return "A" if letters.index(left) < letters.index(right) else "B"

def benchmark_pairs(name: str, data_dir: Optional[str], limit: Optional[int],
                    image_dir: Path) -> tuple:
    """(pairs in our eval format, counts of skipped rows); images are written under image_dir."""
    spec = BENCHMARKS[name]
    source = data_dir or spec["hub"]
    if spec["hub"]:
        local = f"data/{name}" + (f"/{spec['config']}" if spec["config"] else "")
        hint = common.dataset_download_hint(spec["hub"], f"data/{name}", "--data-dir", local)
    else:
        hint = MMRB2_HINT
    if source is None or (data_dir and not Path(data_dir).exists()):
        where = f"no local copy at {data_dir}" if data_dir else "no local copy given"
        raise common.ModelLoadError(f"{name}: {where}; {hint}")
    images = [c for c in (spec["a"], spec["b"], spec["src"]) if c and not name.startswith("mmrb2")]
    ds = common.open_parquet_stream(source, spec["split"], images,
                                    None if data_dir else spec["config"], hint)
    image_dir.mkdir(parents=True, exist_ok=True)
    pairs, seen = [], set()
    skipped = {"unlabelled": 0, "missing_image": 0, "unreadable_image": 0}
    for i, row in enumerate(ds):
        if i == 0:  # a copy without the columns this benchmark needs is an error, not zero pairs
            needed = (spec["prompt"], spec["a"], spec["b"], spec["src"], spec["label"])
            missing = [c for c in needed if c and c not in row]
            if missing:
                raise ValueError(f"{name}: {source} has no column(s) {', '.join(missing)}; "
                                 f"columns found: {', '.join(sorted(row))}")
        if limit is not None and len(pairs) >= limit:
            break
        label = benchmark_label(name, row)
        if label is None:
            skipped["unlabelled"] += 1
            continue
        # ids from the data (or the row's place); a repeated id gets the row number, and the
        # image cache is keyed by a digest of the id, so no row is judged on another's images
        pid = str(row.get("id") or row.get("pair_id") or f"{name}-{i}")
        if pid in seen:
            common.warn(f"{name} row {i}: id {pid!r} repeats an earlier row; kept as {pid}@{i}")
            pid = f"{pid}@{i}"
        seen.add(pid)
        item, problem = {"id": pid, "prompt": str(row[spec["prompt"]]), "label": label}, None
        for key, col in (("image_a", spec["a"]), ("image_b", spec["b"]),
                         ("source_image", spec["src"])):
            # MMRB2 keeps a list of images per field: a response is its first image; an edit's
            # prompt_images are all its sources (2-3 for 178 of 1,000 edit pairs), in order
            if col is None:
                continue
            cells = row.get(col) if isinstance(row.get(col), list) else [row.get(col)]
            many = key == "source_image" and name.startswith("mmrb2")
            paths = []
            for n, cell in enumerate(cells if many else cells[:1]):
                path = image_dir / f"{common.digest(pid)}-{key}{n or ''}.png"
                problem = common.save_embedded_image(cell, path)
                if problem:
                    break
                paths.append(str(path))
            if problem:
                break
            item["source_images" if many else key] = paths if many else paths[0]
        if problem:
            skipped["missing_image" if problem == "missing" else "unreadable_image"] += 1
            common.warn(f"{name} row {i} ({pid}): image {problem}: skipped")
            continue
        pairs.append(item)
    return pairs, skipped

def wilson_interval(correct: int, n: int, z: float = 1.96) -> tuple:
    """95% Wilson score interval of a proportion: honest at a few hundred pairs and near 0 or 1."""
    if n == 0:
        return None, None
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)

def benchmark_command(args: EvalArgs) -> int:
    """One benchmark of Table 1, resumable in --out (default runs/NAME); prints its metrics: the
    accuracy under the paper's protocol with its 95% interval, beside the paper's figure."""
    common.require(not args.pairs, "eval takes --pairs FILE or --benchmark NAME, not both")
    name, spec = args.benchmark, BENCHMARKS[args.benchmark]
    args = dataclasses.replace(args, task=spec["task"], mode=args.mode or "pairwise",
                               scorer=args.scorer or RELEASED[spec["task"]])
    out = Path(args.out or f"runs/{name}")
    common.check_writable_dir(out)
    pairs, skipped = benchmark_pairs(name, args.data_dir, args.limit, out / "images")
    if (out / "predictions.jsonl").is_file():
        common.check_same_run(out, args, EVAL_RUN_KEYS + ("benchmark", "data_dir"),
                              paths=("scorer_adapter", "data_dir", "prompts_dir"))
    common.start_run(out, args)
    metrics = evaluate_preferences(load_scorer(args, args.task), pairs, args.mode, str(out),
                                   args.scorer_batch_size)
    require_predictions(metrics, len(pairs))
    # the paper protocol: GenAI-Bench over A/B votes only, the others over every label
    if name.startswith("genai-bench"):
        correct, n = metrics["correct_without_ties"], metrics["ab_labelled"]
        skipped["tie_or_both_bad_votes"] = metrics["tie_labels"]
    else:
        correct, n = metrics["correct_with_ties"], metrics["pairs"]
    skipped["failed_requests"], skipped["unparsed_replies"] = metrics["failed"], metrics["unparsed"]
    acc = correct / n if n else None
    metrics.update(benchmark=name, protocol=spec["protocol"], skipped_rows=skipped, accuracy=acc,
                   correct=correct, labelled=n, ci95=list(wilson_interval(correct, n)),
                   paper=spec["paper"],
                   difference=None if acc is None else 100 * acc - spec["paper"])
    common.write_atomic(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    print(json.dumps(metrics, indent=2))
    return 0


# ---- main ----
# what an eval's predictions depend on: resuming --out with any of these changed is refused
EVAL_RUN_KEYS = ("mode", "task", "scorer", "scorer_adapter", "scorer_api_base", "pairs",
                 "scorer_quantization", "scorer_max_new_tokens", "scorer_temperature", "max_pixels",
                 "prompts_dir")

def main(argv=None) -> int:
    """`score` critiques images; `eval` measures preference accuracy (a pairs file or Table 1)."""
    args = common.parse({"score": ScoreArgs, "eval": EvalArgs}, argv,
                        description=__doc__.split("\n\n")[0])
    check_scorer_flags(args)
    if args.scorer_max_new_tokens is None:  # what args.json records
        http_benchmark = isinstance(args, EvalArgs) and args.benchmark and args.scorer_api_base
        args.scorer_max_new_tokens = TINY_MAX_NEW_TOKENS if args.scorer == "tiny-random" else \
            OFFICIAL_MAX_TOKENS if http_benchmark else 2048
    import torch
    torch.manual_seed(args.seed)
    if isinstance(args, EvalArgs) and args.benchmark:
        return benchmark_command(args)
    args.scorer = args.scorer or RELEASED[args.task]
    if isinstance(args, ScoreArgs):
        return score_command(args)
    args.mode = args.mode or "pointwise"
    return eval_command(args)

def score_command(args: ScoreArgs) -> int:
    """Critique and score each --image against --prompt; print the report (or JSON)."""
    common.require(args.image, "score needs at least one --image")
    common.require(args.source_image or args.task != "edit", "--task edit needs --source-image")
    paths = args.image + ([args.source_image] if args.source_image else [])
    images, bad = zip(*[common.read_image(p) for p in paths])
    common.require(not any(bad), "cannot read image(s): " + ", ".join(
        f"{p} ({problem})" for p, problem in zip(paths, bad) if problem))
    scorer = load_scorer(args, args.task)
    src = [images[-1]] * len(args.image) if args.task == "edit" else None
    crits = scorer.critique(images[:len(args.image)], [args.prompt] * len(args.image), src)
    warn_truncated(sum(c.truncated for c in crits), len(crits), "--scorer-max-new-tokens",
                   args.scorer)
    results = [{"image": p, "scores": c.scores, "reward": reward_from_scores(c.scores),
                "not_applicable": c.not_applicable, "summary": c.summary,
                "refined_request": c.refined_request, "truncated": c.truncated,
                "critique": c.text} for p, c in zip(args.image, crits)]
    if args.json:
        print(json.dumps(results[0] if len(results) == 1 else results, indent=2))
        return 0
    for r in results:
        print(f"==== {r['image']}\n{r['critique'].strip()}\n---- scores")
        for d, s in r["scores"].items():
            print(f"  {DIMENSION_TITLES[d]:<28} {'N/A or unreadable' if s is None else f'{s:.2f}'}")
        cut = "\n  (cut: --scorer-max-new-tokens)" if r["truncated"] else ""
        print(f"  {'reward (0-1)':<28} {r['reward']:.3f}\n---- refined request\n  "
              f"{r['refined_request']}{cut}")
    return 0

def eval_command(args: EvalArgs) -> int:
    """Preference accuracy on a pairs file, resumable in --out."""
    common.require(args.pairs, "eval needs --pairs FILE.jsonl (our pairs format) or --benchmark "
                   f"NAME (the paper's Table 1: {', '.join(BENCHMARKS)})")
    common.check_writable_dir(args.out)
    pairs = read_pairs(args.pairs, args.limit)
    if args.out:  # the settings bind a folder once it holds a prediction
        if (Path(args.out) / "predictions.jsonl").is_file():
            common.check_same_run(args.out, args, EVAL_RUN_KEYS,
                                  paths=("pairs", "scorer_adapter", "prompts_dir"))
        common.start_run(args.out, args)
    metrics = evaluate_preferences(load_scorer(args, args.task), pairs, args.mode, args.out,
                                   args.scorer_batch_size)
    print(json.dumps(metrics, indent=2))
    require_predictions(metrics, len(pairs))
    return 0

def require_predictions(metrics: dict, pairs: int) -> None:
    """An eval that could predict none of its pairs fails (exit 2), its metrics written."""
    common.require(not pairs or metrics["pairs"] or metrics["unparsed"],
                   f"no prediction could be made: {metrics['failed']} of {pairs} requests failed, "
                   f"{metrics['skipped_pairs']} pairs skipped (see the warnings above)",
                   common.BackendError)

def cli() -> None:
    """The `rationalrewards` command (pyproject.toml)."""
    common.run(main)


if __name__ == "__main__":
    cli()
