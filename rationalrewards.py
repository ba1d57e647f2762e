"""RationalRewards: the reward model that critiques before it scores.

Reference implementation of the shared core of "RationalRewards: Reasoning Rewards Scale
Visual Generation Both Training and Test Time" (arXiv 2604.11626):

* the rubric and output formats of Appendix C/D (pointwise critique-and-refine, pairwise),
  rendered from the plain-text templates in ``prompts/``;
* tolerant parsers for both formats and the score aggregation used by the RL reward
  (Sec. 2.2) and by pairwise preference evaluation (Sec. 3);
* loading of any Qwen3-VL checkpoint (hub id, local path, or ``tiny-random``), 4-bit by
  default on a GPU, optionally with a LoRA adapter (the student that ``parrot.py`` trains);
* two backends behind one interface: in-process transformers and an OpenAI-compatible
  HTTP endpoint (vLLM, SGLang, hosted APIs);
* ``RationalRewardsScorer`` and the ``score`` / ``eval`` command line, including the
  benchmarks of the paper's Table 1 (``eval --benchmark``).

Where is (the method is one block from the top; the harness and plumbing come after it):
    the rubric          prompts/pointwise_t2i.txt, pointwise_edit.txt, pairwise_*.txt (the
                        templates), rendered by ``render_messages``; dimensions: ``T2I_DIMENSIONS``
    the parser          ``parse_pointwise`` -> ``Critique``,
                        ``parse_pairwise`` -> ``PairwiseJudgement``
    the reward          ``reward_from_scores`` (Sec. 2.2), ``preference_from_scores`` (Sec. 3)
    the scorer          ``RationalRewardsScorer``: ``critique``, ``rewards``, ``compare``
    pairwise preference ``predict_pairs``, ``preference_metrics``; resumable over a file:
                        ``evaluate_preferences``
    Table 1             ``BENCHMARKS``, ``benchmark_pairs``, ``run_benchmark``
                        (``eval --benchmark``)
    the command line    ``Args``, ``main``; after the "Plumbing" banner: flags, files and
                        datasets, model loading (``load_vlm``, ``load_generator``, ``tiny-random``),
                        the two inference backends

Smoke run (CPU, no network, about 8 s on 2 cores)::

    python rationalrewards.py score --model tiny-random --prompt "a red bicycle" \
        --image bike.png

Real run (one consumer GPU, the released checkpoint in 4-bit, about 6 GB)::

    python rationalrewards.py score --model TIGER-Lab/RationalRewards-8B-T2I \
        --prompt "a red bicycle leaning on a wall" --image bike.png
    python rationalrewards.py eval --model TIGER-Lab/RationalRewards-8B-T2I \
        --pairs pairs.jsonl --mode pointwise --out runs/eval

Deviations from the paper:
1. The released scorers run in 4-bit nf4 by default (the paper serves them in bf16); pass
   ``--quantization none`` for bf16. Scores can move slightly under quantization.
2. The instruction wording of the templates is ours; the section headers are the paper's,
   so the released checkpoints read and write them unchanged.
3. Images are downscaled to ``--max-pixels`` before they reach the model (a memory bound
   for one GPU); the paper does not state its resolution.

Notation (used in comments throughout the project):
    x = (request, image[s][, source image])   y = preference label   z = rationale / critique
    s_d in [1, 4] = score of dimension d       R in [0, 1] = aggregated reward
"""
import argparse
import ast
import base64
import concurrent.futures
import contextlib
import dataclasses
import functools
import hashlib
import http.client
import inspect
import io
import json
import logging
import math
import os
import re
import shutil
import socket
import sys
import tempfile
import textwrap
import time
import typing
import urllib.error
import urllib.parse
import urllib.request
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

# torch, transformers, diffusers and datasets are imported inside the functions that need them:
# at the top they would make `--help` and every argument error take about 5 s instead of 0.3 s.
from PIL import Image, UnidentifiedImageError

# bitsandbytes warns on every CPU import that an optional fast kernel (fetched from the hub) is
# missing; the built-in CPU path it falls back to is what runs here, so the warning is noise.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
# peft still calls transformers' old gradient-checkpointing names (saving, loading, k-bit prep);
# the deprecation is between those two libraries and nothing a user of this code can act on
warnings.filterwarnings("ignore", message=r"`(is_)?gradient_checkpointing(_enable)?` is deprecated",
                        category=FutureWarning)

# next to this file (a checkout or `pip install -e .`), else where a regular install put them
# (pyproject.toml's data-files: <prefix>/share/..., or <target>/share/... for pip --target)
_HERE = Path(__file__).resolve().parent
_PROMPT_PLACES = (_HERE / "prompts", _HERE / "share" / "rationalrewards" / "prompts",
                  Path(sys.prefix) / "share" / "rationalrewards" / "prompts")
PROMPTS_DIR = next((d for d in _PROMPT_PLACES if d.is_dir()), _HERE / "prompts")

# Rubric of Appendix C/D, in the order the model writes the dimensions. The rubric's text (what
# each dimension means, the 1-4 scale, the output format) is in the templates prompts/*.txt:
# pointwise_t2i.txt, pointwise_edit.txt, pairwise_*.txt; `_DIMENSION_PATTERNS` below reads back
# the section headers they ask for.
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

# ---------------------------------------------------------------------------------------
# Prompts: templates are plain text; `<image>` marks where each image goes, `{name}` a field.
# ---------------------------------------------------------------------------------------
def template_files() -> list:
    """The rubric templates in prompts/ (lists of generation prompts, *_prompts.txt, are not
    templates)."""
    return sorted(p for p in PROMPTS_DIR.glob("*.txt") if not p.name.endswith("_prompts.txt"))


_prompts_override: Optional[Path] = None  # set by --prompts-dir


def set_prompts_dir(path: Optional[str]) -> None:
    """Read templates from `path` first (same file names as prompts/), e.g. the official wording."""
    global _prompts_override
    if path and not Path(path).is_dir():
        raise FileNotFoundError(f"--prompts-dir {path} is not a directory")
    _prompts_override = Path(path) if path else None
    if _prompts_override:
        mine = {p.name for p in template_files()}
        found = sorted(p.name for p in _prompts_override.glob("*.txt") if p.name in mine)
        for name in found:
            check_template(_prompts_override / name, PROMPTS_DIR / name)
        print(f"prompts: {len(found)} template(s) from {path} ({', '.join(found) or 'none'}); "
              f"the rest from {PROMPTS_DIR}", file=sys.stderr)


def check_template(path: Path, reference: Path) -> None:
    """A --prompts-dir template must keep our template's fields ({request}, ...) and its number of
    <image> slots: one without {request} would silently never show the model the user's request."""
    text, ref = read_text_file(path), read_text_file(reference)
    fields = lambda t: set(re.findall(r"\{([a-z_]+)\}", t))
    missing, extra = sorted(fields(ref) - fields(text)), sorted(fields(text) - fields(ref))
    braced = lambda names: ", ".join("{" + f + "}" for f in names)
    problems = []
    if missing:
        problems.append(f"it lacks {braced(missing)}")
    if extra:
        problems.append(f"{braced(extra)} is not a field we fill")
    if text.count("<image>") != ref.count("<image>"):
        problems.append(f"it has {text.count('<image>')} <image> slot(s) where {reference.name} "
                        f"has {ref.count('<image>')}")
    if problems:
        raise ValueError(f"--prompts-dir template {path}: {'; '.join(problems)} "
                         f"(see {reference} for the fields and image slots each template needs)")


def load_prompt(name: str) -> str:
    """The template file's text: from --prompts-dir when it has this file, else from prompts/."""
    path = PROMPTS_DIR / f"{name}.txt"
    if _prompts_override and (_prompts_override / f"{name}.txt").is_file():
        path = _prompts_override / f"{name}.txt"
    if not path.is_file():
        known = sorted(p.stem for p in template_files())
        raise FileNotFoundError(f"prompt template {path} not found (known: {known})")
    return path.read_text()


def split_system(text: str, what: str = "template") -> tuple:
    """(system text or None, user text). A template may open with a line `[system]`, then the
    system turn, then a line `[user]` and the user turn; without `[system]` it is all user turn."""
    if not text.lstrip().startswith("[system]"):
        return None, text
    body = text.lstrip()[len("[system]"):]
    m = re.search(r"^\[user\][ \t]*$", body, re.M)
    if not m:
        raise ValueError(f"{what} opens with [system] but has no [user] line to end it")
    return body[:m.start()].strip("\n"), body[m.end():].lstrip("\n")


def render_messages(name: str, images: list, sources: int = 0, **fields) -> list:
    """Template + images + fields -> [system turn,] user turn in the transformers chat format.

    Images are placed where the template says `<image>`, in the order given. sources > 1: the
    template's first `<image>` (the source image's slot) holds that many source images, and the
    text says how many there are and in which order.
    """
    system = system_prompt(name, **fields)
    text = fill_prompt(name, **fields)
    if sources > 1:
        slots = "\n".join(f"Source image {i + 1} of {sources}: <image>" for i in range(sources))
        note = f"({sources} source images, in order; the instruction refers to them by position)"
        text = text.replace("<image>", f"{note}\n{slots}", 1)
    user = [{"role": "user", "content": to_content(text, images, name)}]
    return ([{"role": "system", "content": system}] if system else []) + user


def _fill(text: str, name: str, fields: dict) -> str:
    missing = set(re.findall(r"\{([a-z_]+)\}", text)) - set(fields)
    if missing:
        raise ValueError(f"prompt {name!r} needs fields {sorted(missing)}")
    for key, value in fields.items():
        text = text.replace("{" + key + "}", str(value))
    return text


def fill_prompt(name: str, **fields) -> str:
    """The template's user turn with its `{name}` fields filled and its `<image>` markers kept."""
    return _fill(split_system(load_prompt(name), name)[1], name, fields)


def system_prompt(name: str, **fields) -> Optional[str]:
    """The template's system turn, filled, or None when it has none (every template in prompts/)."""
    system = split_system(load_prompt(name), name)[0]
    return _fill(system, name, fields) if system else None


def to_content(text: str, images: list, what: str = "text") -> list:
    """Text with `<image>` markers + images -> a chat content list with the images in place."""
    pieces = text.split("<image>")
    if len(pieces) - 1 != len(images):
        raise ValueError(f"{what!r} has {len(pieces) - 1} image slots, got {len(images)} images")
    content = []
    for i, piece in enumerate(pieces):
        if piece.strip():
            content.append({"type": "text", "text": piece})
        if i < len(images):
            content.append({"type": "image", "image": images[i]})
    return content

# ---------------------------------------------------------------------------------------
# Parsing. The model writes markdown; we read it back tolerantly: bold markers, `3.5/4`,
# `[3.5]`, N/A, sections missing or out of order, a reasoning preamble. Unreadable -> None.
# ---------------------------------------------------------------------------------------
_S = r"[\s_/&-]*"  # what may stand between the words of a dimension's name
# First key wins, so the specific names come before "quality"; within a key the long names
# come first, so that a header line holding only "Physical and Visual Quality" is read as
# exactly a title.
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
    """Dimension key if `line` starts a dimension section, else None.

    A header is `1. Title`, `## Title` (a short tail allowed) or a line holding only the title,
    so neither a sentence like "Text rendering is fine." nor a numbered list item inside a
    justification ("1. The hand has six fingers.") starts a new section.
    """
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
            name = {"score a": "score_a", "score b": "score_b"}.get(name, name)
            if name.startswith("score") and name[-1] in "ab" and name not in ("score_a", "score_b"):
                name = "score_" + name[-1]
            if name.startswith("score"):  # the official parsers keep a block's LAST Score line
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
    refined = sections.get("refined request")
    if refined:
        refined = refined.strip()
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
    summary = sections.get("summary") or None
    complete = all({"score_a", "score_b"} <= set(per_dim.get(d, {})) for d in dims)
    return PairwiseJudgement(scores_a, scores_b, winners, justs, summary, preferred, text,
                             complete=complete)

# ---------------------------------------------------------------------------------------
# The reward (paper Sec. 2.2) and the pairwise preference (Sec. 3), from parsed scores.
# ---------------------------------------------------------------------------------------
def reward_from_scores(scores: dict, weights: Optional[dict] = None) -> float:
    """The reward R in [0, 1] of one critique, from its per-dimension scores s_d in [1, 4].

        R = (sum_d w_d * clamp(s_d, 1, 4) / sum_d w_d - 1) / 3

    over the dimensions that were readable and not N/A; 0 when none is. Weights default to 1
    (`--reward-weights`; checked by `check_weights`).
    """
    weights = check_weights(weights, scores)
    readable = {d: min(4.0, max(1.0, float(s))) for d, s in scores.items() if s is not None}
    total_w = sum(weights.get(d, 1.0) for d in readable)
    if not readable or total_w <= 0:
        return 0.0
    mean = sum(weights.get(d, 1.0) * s for d, s in readable.items()) / total_w
    return (mean - 1.0) / 3.0


aggregate = reward_from_scores  # the name of earlier releases, kept for the Python API


def check_weights(weights: Optional[dict], scores: Optional[dict] = None) -> dict:
    """Per-dimension reward weights, validated so that the reward stays in [0, 1].

    Known dimension names only, each weight finite and >= 0, and (given `scores`) not zero on
    every dimension scored. Dimensions not named keep weight 1; weight 0 leaves a dimension out
    (e.g. image_faithfulness=0 gives the official edit-RL reward, which averages the other three).
    """
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
    weights = {}
    for item in spec.split(","):
        name, sep, value = item.partition("=")
        try:
            weights[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise ValueError("reward weights look like 'text_faithfulness=1,physical_quality=0.5', "
                             f"got {spec!r}")
    return check_weights(weights)


def preference_from_scores(scores_a: dict, scores_b: dict) -> str:
    """'A', 'B' or 'tie' from the per-image score sums; N/A or unreadable counts 2.5."""
    keys = set(scores_a) | set(scores_b)
    sum_a = sum(NA_SCORE if scores_a.get(d) is None else float(scores_a[d]) for d in keys)
    sum_b = sum(NA_SCORE if scores_b.get(d) is None else float(scores_b[d]) for d in keys)
    if abs(sum_a - sum_b) < 1e-9:
        return "tie"
    return "A" if sum_a > sum_b else "B"

# ---------------------------------------------------------------------------------------
# The scorer (paper Sec. 2.2): critique -> scores -> reward, and the pairwise judge.
# ---------------------------------------------------------------------------------------
def as_images(items) -> list:
    """PIL images, or paths (str or Path) to open; anything else is a TypeError that says what
    is accepted."""
    out = []
    for x in items:
        if isinstance(x, Image.Image):
            out.append(x.convert("RGB") if x.mode != "RGB" else x)
        elif isinstance(x, (str, os.PathLike)):
            image, problem = read_image(x)
            if image is None:
                raise FileNotFoundError(f"image {x}: {problem}")
            out.append(image)
        else:
            raise TypeError("images are PIL.Image.Image objects or paths (str or pathlib.Path), "
                            f"got {type(x).__name__}")
    return out


class RationalRewardsScorer:
    """Pointwise critique-and-refine scorer: `rewards()` is the RL reward, `critique()` feeds GCR,
    `compare()` is the pairwise judge."""

    def __init__(self, backend, task: str = "t2i", max_new_tokens: int = 2048,
                 temperature: float = 0.1, weights: Optional[dict] = None):
        dimensions(task)
        self.backend, self.task, self.weights = backend, task, weights
        self.max_new_tokens, self.temperature = max_new_tokens, temperature

    @classmethod
    def from_args(cls, args: "Args") -> "RationalRewardsScorer":
        backend = load_backend(args.model or RELEASED[args.task], api_base=args.api_base,
                               adapter=args.adapter, quantization=args.quantization,
                               batch_size=args.batch_size, max_pixels=args.max_pixels,
                               timeout=args.timeout, max_retries=args.max_retries,
                               api_key_env=args.api_key_env,
                               device=args.device)
        return cls(backend, args.task, args.max_new_tokens, args.temperature)

    def _images(self, images, source_images, *others):
        images, others = as_images(images), [as_images(o) for o in others]
        if source_images is not None:
            def one_or_many(s):  # an edit's source: one image, or a list of them (MMRB2)
                return as_images(s) if isinstance(s, (list, tuple)) else as_images([s])[0]
            source_images = [one_or_many(s) for s in source_images]
        return self._groups(images, source_images, *others)

    def _groups(self, images, source_images, *others):
        """[(images of one request in order, number of source images)]. An edit's source may be a
        list of images (MMRB2 edits with 2-3 inputs): all of them come first, in order."""
        if self.task == "edit":
            if source_images is None or len(source_images) != len(images):
                raise ValueError("task 'edit' needs one source image (or a list of them) "
                                 "per edited image")
            out = []
            for s, group in zip(source_images, zip(images, *others)):
                srcs = list(s) if isinstance(s, (list, tuple)) else [s]
                if not srcs:
                    raise ValueError("an edit needs at least one source image")
                out.append(([*srcs, *group], len(srcs)))
            return out
        return [(list(group), 0) for group in zip(images, *others)]

    def _generate(self, msgs: list, allow_failures: bool) -> list:
        """[Generation] for each conversation. A failed request raises BackendError unless
        allow_failures (eval: the official scripts leave failed requests out and count them)."""
        if hasattr(self.backend, "generate_detailed"):
            outs = self.backend.generate_detailed(msgs, self.max_new_tokens, self.temperature)
        else:  # any object with generate(messages, max_new_tokens, temperature) -> texts
            texts = self.backend.generate(msgs, self.max_new_tokens, self.temperature)
            outs = [Generation(t) for t in texts]
        failed = [o.error for o in outs if o.error]
        if failed and not allow_failures:
            raise BackendError(failed[0])
        return outs

    def critique(self, images, requests, source_images=None, allow_failures: bool = False) -> list:
        groups = self._images(images, source_images)
        msgs = [render_messages(f"pointwise_{self.task}", g, request=r, sources=n)
                for (g, n), r in zip(groups, requests)]
        outs = self._generate(msgs, allow_failures)
        return [dataclasses.replace(parse_pointwise(o.text, self.task), truncated=o.truncated,
                                    error=o.error) for o in outs]

    def rewards(self, images, requests, source_images=None) -> list:
        critiques = self.critique(images, requests, source_images)
        return [reward_from_scores(c.scores, self.weights) for c in critiques]

    def compare(self, images_a, images_b, requests, source_images=None,
                allow_failures: bool = False) -> list:
        groups = self._images(images_a, source_images, images_b)
        msgs = [render_messages(f"pairwise_{self.task}", g, request=r, sources=n)
                for (g, n), r in zip(groups, requests)]
        outs = self._generate(msgs, allow_failures)
        return [dataclasses.replace(parse_pairwise(o.text, self.task), truncated=o.truncated,
                                    error=o.error) for o in outs]

# ---------------------------------------------------------------------------------------
# Preference evaluation (paper Sec. 3): a batch of pairs -> predictions -> accuracy.
# ---------------------------------------------------------------------------------------
def pair_id(prompt: str, *parts) -> str:
    return hashlib.sha1("\x1f".join([prompt, *map(str, parts)]).encode()).hexdigest()[:16]


def predict_pairs(scorer: RationalRewardsScorer, batch: list, mode: str) -> list:
    """One prediction record per (pair, images) in `batch`; a failed request gives a `failed`
    record."""
    a, b = [im["image_a"] for _, im in batch], [im["image_b"] for _, im in batch]
    reqs = [p["prompt"] for p, _ in batch]
    src = [im["source_image"] for _, im in batch] if scorer.task == "edit" else None
    if mode == "pointwise":  # both images of every pair in one batched critique call
        crits = scorer.critique(a + b, reqs * 2, src * 2 if src else None, allow_failures=True)
        results = [(ca.scores, cb.scores, ca.readable and cb.readable, [ca.text, cb.text],
                    int(ca.truncated) + int(cb.truncated), ca.error or cb.error,
                    ca.complete and cb.complete)
                   for ca, cb in zip(crits[:len(batch)], crits[len(batch):])]
    else:
        judgements = scorer.compare(a, b, reqs, src, allow_failures=True)
        results = [(j.scores_a, j.scores_b, j.preferred is not None, [j.text], int(j.truncated),
                    j.error, j.complete) for j in judgements]
    records = []
    for (p, _), (sa, sb, ok, texts, cut, error, complete) in zip(batch, results):
        # No reply, or an empty one ("" with HTTP 200): the official scripts mark the pair
        # `success = False` (`if evaluation_response:` fails on ""), so it is left out of the
        # accuracy, counted, and retried by the next run.
        if not error and not all(t.strip() for t in texts):
            error = "empty reply"
        if error:
            records.append({"id": p["id"], "label": p["label"], "failed": True, "error": error})
            continue
        record = {"id": p["id"], "label": p["label"], "truncated": cut, "outputs": texts}
        # Editing: the official parsers (rm_inference/inference_*_imgedit.py) raise when a
        # dimension lacks its Score lines, which leaves the pair out (`success = False`); a cut
        # or unparseable edit reply is counted as `unparsed`, not judged on partial scores.
        if scorer.task == "edit" and not complete:
            records.append({**record, "unparsed": True})
            continue
        # Text-to-image: each unreadable dimension counts 2.5 (the official t2i parsers write N/A,
        # compute_pairwise_accuracy.py's fallback), so a wholly unreadable side loses to any
        # score above 2.5.
        records.append({**record, "scores_a": sa, "scores_b": sb,
                        "predicted": preference_from_scores(sa, sb), "unreadable": not ok})
    return records


def dimension_means(scores: list, dims: tuple = T2I_DIMENSIONS) -> dict:
    """{dimension: mean of its readable scores over `scores` (a list of score dicts), or None}."""
    out = {}
    for d in dims:
        vals = [s[d] for s in scores if s.get(d) is not None]
        out[d] = sum(vals) / len(vals) if vals else None
    return out


def preference_metrics(records: list, task: str) -> dict:
    """Metrics over prediction records (one per pair; failed requests are counted, not scored).

    accuracy_with_ties: over every labelled pair, a tie label right only when the score sums are
    equal;
    accuracy_without_ties: over A/B labels only, a predicted tie counted wrong (the protocol of the
    official compute_pairwise_accuracy.py once tie votes carry no label).
    """
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
            "ab_labelled": len(no_tie),
            "tie_labels": len(scored) - len(no_tie),
            "unreadable_outputs": sum(r["unreadable"] for r in scored),
            "predicted_ties": sum(r["predicted"] == "tie" for r in scored),
            "outputs": sum(len(r.get("outputs") or [None]) for r in scored + unparsed),
            "truncated_outputs": sum(r.get("truncated", 0) for r in scored + unparsed),
            "failed": len(failed), "unparsed": len(unparsed),
            "mean_scores": dim_means}


# =======================================================================================
# The method ends here. Below: the harness of the `score` and `eval` commands (their flags,
# the resumable evaluation of a pairs file, the Table 1 benchmark adapters, `main`), then
# the plumbing that every module of the project shares.
# =======================================================================================
@dataclass
class Args:
    command: Literal["score", "eval"] = field(default="score", metadata={"positional": True})
    """`score`: critique and score images; `eval`: preference accuracy on a file of pairs"""
    model: Optional[str] = None
    """hub id, local directory, or `tiny-random` (default: the released checkpoint for --task);
    with --api-base, the model name the server serves"""
    adapter: Optional[str] = None
    """LoRA adapter directory applied on top of --model (e.g. the student written by parrot.py)"""
    task: Literal["t2i", "edit"] = "t2i"
    """t2i: three dimensions; edit: four (adds image faithfulness) and needs a source image"""
    prompt: Optional[str] = field(default=None, metadata={"command": "score"})
    """score: the generation request (or editing instruction)"""
    image: list = field(default_factory=list, metadata={"command": "score"})
    """score: one or more image files, all judged against --prompt"""
    source_image: Optional[str] = field(default=None, metadata={"command": "score"})
    """score --task edit: the image that was edited"""
    pairs: Optional[str] = field(default=None, metadata={"command": "eval"})
    """eval: JSONL of pairs: prompt, image_a, image_b, label (A/B/tie), optional source_image, id"""
    benchmark: Optional[Literal["genai-bench-t2i", "genai-bench-edit", "editreward-bench",
                                "mmrb2-t2i", "mmrb2-edit",
                                "all"]] = field(default=None, metadata={"command": "eval"})
    """eval: a benchmark of the paper's Table 1 instead of --pairs (its task, labels and protocol
    follow it)"""
    data_dir: Optional[str] = field(default=None, metadata={"command": "eval"})
    """eval --benchmark: a local copy (parquet file or directory; with `all`, a folder holding one
    per name)"""
    mode: Optional[Literal["pointwise", "pairwise"]] = field(default=None,
                                                             metadata={"command": "eval"})
    """eval: pointwise scores each image and compares sums; pairwise reads both images at once
    (default: pointwise for --pairs, pairwise for --benchmark, as the paper evaluates)"""
    limit: Optional[int] = field(default=None, metadata={"command": "eval"})
    """eval: use only the first N pairs"""
    out: Optional[str] = field(default=None, metadata={"command": "eval"})
    """eval: directory for predictions.jsonl (resumable), metrics.json and args.json"""
    json: bool = field(default=False, metadata={"command": "score"})
    """score: print one JSON object instead of the readable report"""
    quantization: Literal["auto", "4bit", "8bit", "none"] = "auto"
    """auto = 4-bit nf4 on a GPU, none on CPU"""
    api_base: Optional[str] = None
    """OpenAI-compatible endpoint, e.g. http://localhost:8000/v1 (vLLM, SGLang); skips local
    loading"""
    api_key_env: str = "OPENAI_API_KEY"
    """environment variable holding the API key for --api-base (may be unset for local servers)"""
    max_new_tokens: Optional[int] = None
    """longest critique the scorer may write (default 2048, the paper's; eval --benchmark with
    --api-base: 20480, the official evaluation scripts' budget, which costs nothing a short reply
    does not use)"""
    temperature: float = 0.1
    """scorer sampling temperature (paper: 0.1); 0 means greedy"""
    batch_size: int = 8
    """prompts per generate() call (transformers) or requests in flight (HTTP)"""
    max_pixels: int = 768 * 768
    """images are downscaled to at most this many pixels before the model sees them"""
    timeout: float = 600.0
    """HTTP backend: seconds to wait for one response"""
    max_retries: int = 3
    """HTTP backend: retries after a failed request, with exponential backoff"""
    prompts_dir: Optional[str] = None
    """templates with the same file names read from this folder first (e.g. the official wording; a
    file may open with [system] ... [user] to add a system turn)"""
    device: Optional[str] = None
    """where the model runs: cuda, cuda:1, cpu (default: cuda when there is a GPU)"""
    seed: int = 0
    """seed for sampling"""


@dataclass
class ScorerArgs:
    """The scorer's flags as rl_nft.py and gcr_loop.py take them (their Args inherit these fields),
    with the meanings of rationalrewards.py's --model, --adapter, --api-base, --quantization, ..."""
    scorer: Optional[str] = None
    """scorer VLM: hub id, local directory or tiny-random (default: the released checkpoint for the
    task); with --scorer-api-base, the model name the server serves"""
    scorer_adapter: Optional[str] = None
    """LoRA adapter applied on top of --scorer, e.g. the PARROT student (runs/X/student)"""
    scorer_api_base: Optional[str] = None
    """OpenAI-compatible endpoint serving the scorer (vLLM, SGLang); skips local loading"""
    scorer_quantization: Literal["auto", "4bit", "8bit", "none"] = "auto"
    """auto = 4-bit nf4 on a GPU, none on CPU"""
    scorer_batch_size: int = 8
    """critiques per generate() call, or requests in flight over HTTP"""
    scorer_max_new_tokens: Optional[int] = None
    """longest critique (default 2048 as in the paper; 64 for tiny-random, whose text is noise
    anyway)"""
    scorer_temperature: float = 0.1
    """scorer sampling temperature (paper: 0.1)"""
    max_pixels: int = 768 * 768
    """images are downscaled to at most this many pixels before the scorer sees them"""
    timeout: float = 600.0
    """HTTP scorer: seconds to wait for one response"""
    max_retries: int = 3
    """HTTP scorer: retries after a failed request, with exponential backoff"""
    api_key_env: str = "OPENAI_API_KEY"
    """environment variable holding the API key for --scorer-api-base"""
    prompts_dir: Optional[str] = None
    """templates with the same file names read from this folder first (see rationalrewards.py
    --help)"""
    device: Optional[str] = None
    """where the models run (generator and scorer): cuda, cuda:1, cpu (default: cuda when there is a
    GPU)"""


def build_scorer(args: ScorerArgs, task: str = "t2i",
                 weights: Optional[dict] = None) -> "RationalRewardsScorer":
    """The scorer described by the --scorer-* flags (shared by rl_nft.py and gcr_loop.py)."""
    model = args.scorer or RELEASED[task]
    tiny = model == "tiny-random"
    tokens = args.scorer_max_new_tokens or (TINY_MAX_NEW_TOKENS if tiny else 2048)
    backend = load_backend(model, api_base=args.scorer_api_base, adapter=args.scorer_adapter,
                           quantization=args.scorer_quantization, batch_size=args.scorer_batch_size,
                           max_pixels=args.max_pixels, timeout=args.timeout,
                           max_retries=args.max_retries, api_key_env=args.api_key_env,
                           device=args.device)
    return RationalRewardsScorer(backend, task, tokens, args.scorer_temperature, weights)


def read_pairs(path, limit: Optional[int] = None) -> list:
    """Pairs from our JSONL format; image paths are resolved against the file's directory."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pairs file {path} not found")
    pairs = []
    for n, line in enumerate(read_text_file(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            label = str(rec["label"]).strip()
            label = {"a": "A", "b": "B", "tie": "tie"}[label.lower()]
            item = {"prompt": rec["prompt"], "label": label}
            for k in ("image_a", "image_b", "source_image"):
                if rec.get(k):
                    item[k] = str(path.parent / rec[k])
            if "image_a" not in item or "image_b" not in item:
                raise KeyError("image_a/image_b")
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
            raise ValueError(
                f"{path}:{n}: expected prompt, image_a, image_b, label (A/B/tie): {err!r}"
            ) from None
        # the id comes from the record as written, never from where the file was found, so the
        # same file named by a relative or an absolute path resumes the same run
        source = rec.get("source_image") or ""
        item["id"] = str(rec.get("id") or pair_id(rec["prompt"], rec["image_a"], rec["image_b"],
                                                  source))
        pairs.append(item)
        if limit is not None and len(pairs) >= limit:
            break
    return pairs


def warn_truncated(truncated: int, total: int, flag: str = "--max-new-tokens",
                   model: Optional[str] = None) -> None:
    """Outputs cut by the token limit lose their later dimensions (scored 2.5) or their refined
    request: warn when more than 1% of them were cut (not for tiny-random, whose text is noise and
    always runs to the limit)."""
    if model != "tiny-random" and total and truncated / total > 0.01:
        warn(
            f"{truncated} of {total} outputs ({100 * truncated / total:.1f}%) were cut by the "
            f"token limit before the model finished; raise {flag}")


def evaluate_preferences(scorer: RationalRewardsScorer, pairs: list, mode: str = "pointwise",
                         out_dir: Optional[str] = None, batch_size: int = 8) -> dict:
    """Predict every pair, append each prediction to out_dir/predictions.jsonl, return metrics over
    exactly `pairs`.

    A rerun with the same out_dir skips pairs already predicted and retries the failed ones (the
    newer record supersedes the older one).
    """
    from tqdm import tqdm
    pred_path = Path(out_dir) / "predictions.jsonl" if out_dir else None
    if pred_path:
        pred_path.parent.mkdir(parents=True, exist_ok=True)
    latest = {r["id"]: r for r in (read_jsonl(pred_path) if pred_path else [])}
    todo = [p for p in pairs if p["id"] not in latest or latest[p["id"]].get("failed")]
    skipped = {"missing": 0, "unreadable": 0}
    if len(todo) < len(pairs):
        print(
            f"resumed: {len(pairs) - len(todo)} of {len(pairs)} pairs already predicted in "
            f"{out_dir}",
            file=sys.stderr)
    bar = tqdm(total=len(todo), desc=f"eval ({mode})", unit="pair", disable=not todo)
    for i in range(0, len(todo), batch_size):
        batch = []
        for p in todo[i:i + batch_size]:
            # an edit pair has one source image, or several (`source_images`: MMRB2 edits),
            # sent in order
            sources = p.get("source_images")
            if not sources:
                sources = [p["source_image"]] if p.get("source_image") else []
            files = [("image_a", p["image_a"]), ("image_b", p["image_b"])]
            files += [("source", f) for f in sources]
            read = [(key, f, *read_image(f)) for key, f in files]
            bad = {f: problem for _, f, _, problem in read if problem}
            if scorer.task == "edit" and not sources:
                bad["source_image"] = "missing (an edit pair needs one)"
            if bad:
                all_missing = all(v.startswith("missing") for v in bad.values())
                skipped["missing" if all_missing else "unreadable"] += 1
                warn(f"skipping pair {p['id']}: " + "; ".join(f"{f}: {v}" for f, v in bad.items()))
                continue
            images = {key: im for key, _, im, _ in read if key != "source"}
            if sources:
                loaded = [im for key, _, im, _ in read if key == "source"]
                images["source_image"] = loaded if p.get("source_images") else loaded[0]
            batch.append((p, images))
        for rec in predict_pairs(scorer, batch, mode) if batch else []:
            latest[rec["id"]] = rec
            if pred_path:
                append_jsonl(pred_path, rec)
            if rec.get("failed"):
                warn(f"pair {rec['id']}: the request failed ({rec['error'][:200]}); left out and "
                     "retried by the next run into the same --out")
        bar.update(len(todo[i:i + batch_size]))
        done = [latest[q["id"]] for q in pairs if q["id"] in latest]
        bar.set_postfix(
            acc=f"{preference_metrics(done, scorer.task)['accuracy_with_ties'] or 0:.3f}")
    bar.close()
    records = [latest[p["id"]] for p in pairs if p["id"] in latest]   # exactly the pairs asked for
    metrics = {**preference_metrics(records, scorer.task),
               "skipped_pairs": sum(skipped.values()),
               "skipped_missing_image": skipped["missing"],
               "skipped_unreadable_image": skipped["unreadable"],
               "mode": mode}
    warn_truncated(metrics["truncated_outputs"], metrics["outputs"],
                   model=getattr(scorer.backend, "name", None))
    if out_dir:
        (Path(out_dir) / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics

# ---------------------------------------------------------------------------------------
# The paper's Table 1: one command per benchmark, its official labels and protocol.
# ---------------------------------------------------------------------------------------
# Each row streams from the hub (or --data-dir) and becomes our pairs: A = left /
# candidate_1. The "paper protocol" accuracy of each benchmark follows the official code that
# produced the paper's figure:
# - GenAI-Bench: TIGER-AI-Lab/RationalRewards
# reward_model_evaluation/rm_inference/inference_genaibench_*.py
#   maps leftvote -> A, rightvote -> B and every other vote (tie, both bad) to no label, and
#   compute_pairwise_accuracy.py skips unlabelled pairs and counts a predicted tie (equal sums) as
#   wrong. (The newer modular_rm_eval adapter maps those votes to "tie", but its parser looks for
#   "2. Physical Quality", which never matches the rubric's "2. Physical and Visual Quality", so on
#   that path physical quality is 2.5 on every reply: it cannot have produced the paper's figures.)
#   Tie votes are kept as "tie" labels for the second, with-ties column.
# - MMRB2: the same scripts (inference_mmrb2_*.py): `chosen` a/b (ties, if any, must be predicted
#   as ties); an edit's `prompt_images` are all sent, in order, before the two candidates.
# - EditReward-Bench: its own repository (TIGER-AI-Lab/EditReward,
# EditReward/evaluate/eval_bench.py):
#   pairwise comparisons of 2-, 3- and 4-way samples, accuracy over comparisons with A=B ties, and
#   the strict (group) accuracy per subset: a sample is right when all its comparisons are.
# Everywhere a request that failed (no reply after the retries, or an empty one) is left out and
# counted, as the official scripts do with `success = False`. An unreadable text-to-image reply
# scores 2.5 per missing dimension; an edit reply missing any dimension's Score A/B line is left
# out and counted as `unparsed` (the official edit parsers raise on it).
BENCHMARKS = {
    "genai-bench-t2i": dict(hub="TIGER-Lab/GenAI-Bench", config="image_generation", split="test",
                            task="t2i", prompt="prompt", a="left_image", b="right_image", src=None,
                            paper=69.8,
                            baselines={"Qwen3-VL-8B (base)": 55.1, "Gemini 2.5 Pro": 66.2}),
    "genai-bench-edit": dict(hub="TIGER-Lab/GenAI-Bench", config="image_edition", split="test",
                             task="edit", prompt="instruct_prompt", a="left_output_image",
                             b="right_output_image", src="source_image", paper=80.1, baselines={}),
    "editreward-bench": dict(hub="TIGER-Lab/EditReward-Bench", config=None, split="train",
                             task="edit", prompt="instruction", a="candidate_1", b="candidate_2",
                             src="source_image", paper=66.2, baselines={}),
    # MMRB2's pairs are built by facebookresearch/MMRB2 from facebook/MMRB2_image; read locally
    "mmrb2-t2i": dict(hub=None, config=None, split="train", task="t2i", prompt="prompt_text",
                      a="response_a_images", b="response_b_images", src=None, paper=64.2,
                      baselines={}),
    "mmrb2-edit": dict(hub=None, config=None, split="train", task="edit", prompt="prompt_text",
                       a="response_a_images", b="response_b_images", src="prompt_images",
                       paper=70.3, baselines={}),
}


def benchmark_label(name: str, row: dict) -> Optional[str]:
    """'A', 'B' or 'tie' for one benchmark row; None when the row carries no usable label."""
    if name.startswith("genai-bench"):
        vote = str(row.get("vote_type") or "").strip().lower()
        # tie and both-bad votes: "tie" here; the paper-protocol accuracy leaves them
        # out (see above)
        return {"leftvote": "A", "rightvote": "B"}.get(vote, "tie") if vote else None
    if name == "editreward-bench":
        return editreward_label(row.get("ranking"), row.get("comparison_type"))
    # MMRB2, as compute_pairwise_accuracy.py reads it
    chosen = str(row.get("chosen") or "").strip().lower()
    return {
        "a": "A", "left": "A", "leftvote": "A", "1": "A", "model_1": "A", "b": "B", "right": "B",
        "rightvote": "B", "2": "B", "model_2": "B", "tie": "tie", "draw": "tie", "equal": "tie",
        "a=b": "tie"
    }.get(chosen)


def editreward_label(ranking, comparison_type) -> Optional[str]:
    """EditReward-Bench: which of candidate_1 (A) and candidate_2 (B) humans ranked higher.

    `comparison_type` names the two letters compared ("AvsC": candidate_1 is A, candidate_2 is C);
    the `ranking` is a pairwise or a full ranking ("C>A", "C>A>B": the letter written first wins, as
    eval_bench.py's get_pairwise_gt reads it) or a 2-way tie ("A=B=Good", "A=B=Bad"). A row without
    `comparison_type` is a 2-way sample: its pair is the ranking's two letters, in alphabetical
    order.
    """
    ranking = str(ranking or "").replace(" ", "")
    if ranking in ("A=B=Good", "A=B=Bad") or re.fullmatch(r"[A-Z]=[A-Z]", ranking):
        return "tie"
    letters = re.findall(r"[A-Z]", ranking)
    repeated = len(letters) != len(set(letters))
    if not letters or repeated or not re.fullmatch(r"[A-Z](>[A-Z])+", ranking):
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
    local = f"data/{name}"
    if spec["hub"] is None:
        hint = (
            "needs pairs built with facebookresearch/MMRB2 (images from facebook/MMRB2_image): "
            "parquet with pair_id, prompt_text, prompt_images, response_a_images, "
            "response_b_images, chosen; pass --data-dir"
        )
    else:
        subset = f"{local}/{spec['config']}" if spec["config"] else local
        hint = dataset_download_hint(spec["hub"], local, "--data-dir", subset)
    if source is None or (data_dir and not Path(data_dir).exists()):
        where = f"no local copy at {data_dir}" if data_dir else "no local copy given"
        sep = ";" if spec["hub"] is None else "."
        raise ModelLoadError(f"{name}: {where}{sep} {hint}")
    cols = [c for c in (spec["a"], spec["b"], spec["src"]) if c]
    ds = open_parquet_stream(source, spec["split"], [] if name.startswith("mmrb2") else cols,
                             None if data_dir else spec["config"], hint)
    image_dir.mkdir(parents=True, exist_ok=True)
    pairs, skipped = [], {"unlabelled": 0, "missing_image": 0, "unreadable_image": 0}
    label_col = {"genai": "vote_type", "editr": "ranking", "mmrb2": "chosen"}[name[:5]]
    seen = set()
    for i, row in enumerate(ds):
        if i == 0:  # a file without the columns this benchmark needs is an error, not zero pairs
            missing = [
                c for c in (spec["prompt"], spec["a"], spec["b"], spec["src"], label_col)
                if c and c not in row
            ]
            if missing:
                raise ValueError(
                    f"{name}: {source} has no column(s) {', '.join(missing)}; columns found: "
                    f"{', '.join(sorted(row))}")
        if limit is not None and len(pairs) >= limit:
            break
        label = benchmark_label(name, row)
        if label is None:
            skipped["unlabelled"] += 1
            continue
        # ids from the data (or the row's place in its split), never from where the files
        # were found; a repeated id gets the row number, so that no row is judged on
        # another's cached images
        pid = str(row.get("id") or row.get("pair_id") or f"{name}-{i}")
        if pid in seen:
            warn(f"{name} row {i}: id {pid!r} repeats an earlier row; kept as {pid}@{i}")
            pid = f"{pid}@{i}"
        seen.add(pid)
        item, problem = {"id": pid, "prompt": str(row[spec["prompt"]]), "label": label}, None
        columns = (("image_a", spec["a"]), ("image_b", spec["b"]), ("source_image", spec["src"]))
        for key, col in columns:
            if col is None:
                continue
            cells = row.get(col)
            # MMRB2 keeps a list of images per field: a response is its first image; an
            # edit's prompt_images are all its source images (2-3 for 178 of 1,000 edit
            # pairs), kept in order
            cells = cells if isinstance(cells, list) else [cells]
            if key != "source_image" or not name.startswith("mmrb2"):
                cells = cells[:1]
            paths = []
            for n, cell in enumerate(cells or [None]):
                # keyed by a digest of the id: ids that differ only in characters a file name
                # cannot hold (g7/AvsB, g7_AvsB) never share a cached image
                path = image_dir / f"{pair_id(pid)}-{key}{n or ''}.png"
                problem = save_embedded_image(cell, path)
                if problem:
                    break
                paths.append(str(path))
            if problem:
                break
            if key == "source_image" and name.startswith("mmrb2"):
                item["source_images"] = paths
            else:
                item[key] = paths[0]
        if problem:
            skipped["missing_image" if problem == "missing" else "unreadable_image"] += 1
            warn(f"{name} row {i} ({pid}): image {problem}: skipped")
            continue
        if name == "editreward-bench":
            item["group"] = pid.split("_")[0]  # the official grouping of a 3- or 4-way sample
            item["subset"] = str(row.get("dataset") or "")  # 2pair / 3pair / 4pair
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


def group_accuracy(records: list, pairs: list) -> Optional[float]:
    """Strict accuracy over the groups of `pairs` (EditReward-Bench samples): a group is right
    only when it has ALL its comparisons (n(n-1)/2 for the n candidates its subset names: 1, 3 or
    6), each one judged (no failed request, no unparsed reply) and right. A group that lost a
    comparison (a skipped row, a failure) counts as wrong, so failures cannot inflate the figure."""
    by_id = {r["id"]: r for r in records}
    groups = {}
    for p in pairs:
        if p.get("group") is not None:
            groups.setdefault((p["group"], p.get("subset")), []).append(by_id.get(p["id"]))

    def right(subset, recs):
        n = re.search(r"\d+", subset or "")
        need = math.comb(int(n.group()), 2) if n else len(recs)
        judged = [r for r in recs if r and "predicted" in r]
        return len(judged) == need and all(r["predicted"] == r["label"] for r in judged)
    return sum(right(s, recs) for (_, s), recs in groups.items()) / len(groups) if groups else None


_backends = {}  # one loaded model serves every benchmark of an `all` run


OFFICIAL_MAX_TOKENS = 20480  # the official evaluation scripts' max_tokens
# tiny-random writes noise to the token limit whatever it is: smoke runs stop it early
TINY_MAX_NEW_TOKENS = 64


def run_benchmark(name: str, args: Args) -> dict:
    spec = BENCHMARKS[name]
    data_dir = args.data_dir
    if args.data_dir and args.benchmark == "all":
        data_dir = str(Path(args.data_dir) / name)
    sub = dataclasses.replace(args, benchmark=name, task=spec["task"],
                              model=args.model or RELEASED[spec["task"]],
                              mode=args.mode or "pairwise", data_dir=data_dir)
    if args.benchmark == "all" or not args.out:
        out = Path(args.out or "runs") / name
    else:
        out = Path(args.out)
    check_writable_dir(out)
    pairs, skipped = benchmark_pairs(name, sub.data_dir, sub.limit, out / "images")
    if any(skipped.values()):
        counts = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in skipped.items() if v)
        print(f"{name}: skipped rows: {counts}", file=sys.stderr)
    if (out / "predictions.jsonl").is_file():
        check_same_run(out, sub, EVAL_RUN_KEYS + ("benchmark", "data_dir"),
                       paths=("adapter", "data_dir"))
    save_args(sub, out)
    key = (sub.model, sub.adapter, sub.api_base, sub.quantization)
    if key not in _backends:
        _backends[key] = RationalRewardsScorer.from_args(sub).backend
    scorer = RationalRewardsScorer(_backends[key], sub.task, sub.max_new_tokens, sub.temperature)
    metrics = evaluate_preferences(scorer, pairs, sub.mode, str(out), sub.batch_size)
    latest = {r["id"]: r for r in read_jsonl(out / "predictions.jsonl")}
    records = [latest[p["id"]] for p in pairs if p["id"] in latest]
    # the paper-protocol accuracy: GenAI-Bench over A/B votes only; MMRB2 and EditReward-Bench
    # over every label
    if name.startswith("genai-bench"):
        correct, n = metrics["correct_without_ties"], metrics["ab_labelled"]
        skipped["tie_or_both_bad_votes"] = metrics["tie_labels"]
    else:
        correct, n = metrics["correct_with_ties"], metrics["pairs"]
    skipped["failed_requests"], skipped["unparsed_replies"] = metrics["failed"], metrics["unparsed"]
    low, high = wilson_interval(correct, n)
    acc = correct / n if n else None
    metrics.update(benchmark=name, protocol=PROTOCOLS[name], skipped_rows=skipped, accuracy=acc,
                   correct=correct, labelled=n, ci95=[low, high], paper=spec["paper"],
                   difference=None if acc is None else 100 * acc - spec["paper"],
                   baselines=spec["baselines"])
    if name == "editreward-bench":
        metrics["group_accuracy"] = group_accuracy(records, pairs)
        subsets = sorted({p.get("subset") for p in pairs if p.get("subset")})
        metrics["group_accuracy_by_subset"] = {
            s: group_accuracy(records, [p for p in pairs if p.get("subset") == s]) for s in subsets}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


PROTOCOLS = {
    "genai-bench-t2i":
        "A/B votes only (tie and both-bad votes skipped), a predicted tie is wrong "
        "(rm_inference/inference_genaibench_imggen.py + compute_pairwise_accuracy.py)",
    "genai-bench-edit":
        "A/B votes only (tie and both-bad votes skipped), a predicted tie is wrong "
        "(rm_inference/inference_genaibench_imgedit.py + compute_pairwise_accuracy.py)",
    "editreward-bench":
        "every comparison, ties A=B included; strict group accuracy per subset "
        "(EditReward/evaluate/eval_bench.py)",
    "mmrb2-t2i":
        "every labelled pair (rm_inference/inference_mmrb2_imggen.py + "
        "compute_pairwise_accuracy.py)",
    "mmrb2-edit":
        "every labelled pair, all source images sent (rm_inference/inference_mmrb2_imgedit.py + "
        "compute_pairwise_accuracy.py)",
}


def print_benchmark_table(rows: list) -> None:
    """Ours (paper protocol, with its 95% interval) beside the paper's RationalRewards-8B, per
    benchmark."""
    print(
        f"{'benchmark':<17} {'paper':>6} {'ours':>6} {'w/ ties':>7} {'n':>6} {'95% CI':>11} "
        f"{'skipped':>7} {'failed':>6} {'unpars':>6} {'cut':>5}  note")
    for r in rows:
        if "error" in r:
            print(
                f"{r['benchmark']:<17} {r['paper']:>6.1f} {'-':>6} {'-':>7} {'-':>6} {'-':>11} "
                f"{'-':>7} {'-':>6} {'-':>6} {'-':>5}  not run:")
            print(textwrap.indent(textwrap.fill(r["error"], 96, break_on_hyphens=False), " " * 4))
            continue
        pct = lambda v: "-" if v is None else f"{100 * v:.1f}"
        ci = f"{pct(r['ci95'][0])}-{pct(r['ci95'][1])}" if r["ci95"][0] is not None else "-"
        skipped = sum(v for k, v in r["skipped_rows"].items()
                      if k not in ("failed_requests", "unparsed_replies"))
        note = [f"diff {r['difference']:+.1f}"] if r["difference"] is not None else []
        if r.get("group_accuracy") is not None:
            subsets = r["group_accuracy_by_subset"].items()
            note.append("group acc " + ", ".join(f"{k} {pct(v)}" for k, v in subsets))
        note += [f"{k} {v}" for k, v in r["baselines"].items()]
        note += [f"{r['unreadable_outputs']} unreadable"] if r["unreadable_outputs"] else []
        print(
            f"{r['benchmark']:<17} {r['paper']:>6.1f} {pct(r['accuracy']):>6} "
            f"{pct(r['accuracy_with_ties']):>7} {r['labelled']:>6} {ci:>11} {skipped:>7} "
            f"{r['failed']:>6} {r['unparsed']:>6} {r['truncated_outputs']:>5}  {'; '.join(note)}"
        )
    print(
        "paper: RationalRewards-8B in the paper's Table 1; ours: the same protocol as the official "
        "code (README, Table 1); w/ ties: tie labels kept, a tie right only when predicted; "
        "skipped: unlabelled rows, tie votes (GenAI-Bench) and unreadable images; failed: requests "
        "with no or an empty reply (rerun to retry); unpars: edit replies missing a dimension's "
        "scores, left out as the official edit parsers do; cut: outputs stopped by the token "
        "limit. A gap inside the 95% interval is noise.")

# ---------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------
# what an eval's predictions depend on: resuming --out with any of these changed is refused
EVAL_RUN_KEYS = ("mode", "task", "model", "adapter", "api_base", "pairs", "quantization",
                 "max_new_tokens", "temperature", "max_pixels", "prompts_dir")


def main(argv=None) -> int:
    """`score` critiques images; `eval` measures preference accuracy on a pairs file or a
    benchmark."""
    args = parse_args(Args, argv, description=__doc__.split("\n\n")[0])
    require_positive(args, "limit", "batch_size", "max_new_tokens", "max_pixels")
    check_common_args(args)
    if args.out and args.command == "eval" and not args.benchmark:
        check_writable_dir(args.out)
    if args.max_new_tokens is None:
        over_http_benchmark = args.command == "eval" and args.benchmark and args.api_base
        args.max_new_tokens = OFFICIAL_MAX_TOKENS if over_http_benchmark else 2048
        if args.model == "tiny-random":
            args.max_new_tokens = TINY_MAX_NEW_TOKENS
    set_prompts_dir(args.prompts_dir)
    import torch
    torch.manual_seed(args.seed)
    if args.command == "eval" and args.benchmark:
        return benchmark_command(args)
    args.model = args.model or RELEASED[args.task]
    args.mode = args.mode or "pointwise"
    return score_command(args) if args.command == "score" else eval_command(args)


def score_command(args: Args) -> int:
    """Critique and score each --image against --prompt; print the report (or JSON)."""
    if not args.prompt or not args.image:
        raise SystemExit("score needs --prompt and at least one --image")
    if args.task == "edit" and not args.source_image:
        raise SystemExit("score --task edit needs --source-image")
    paths = args.image + ([args.source_image] if args.source_image else [])
    read = [read_image(p) for p in paths]
    bad = [f"{p} ({problem})" for p, (_, problem) in zip(paths, read) if problem]
    if bad:
        raise SystemExit(f"cannot read image(s): {', '.join(bad)}")
    images = [im for im, _ in read]
    scorer = RationalRewardsScorer.from_args(args)
    src = [images[-1]] * len(args.image) if args.task == "edit" else None
    crits = scorer.critique(images[:len(args.image)], [args.prompt] * len(args.image), src)
    results = [{"image": p, "scores": c.scores, "reward": reward_from_scores(c.scores),
                "not_applicable": c.not_applicable, "summary": c.summary,
                "refined_request": c.refined_request, "truncated": c.truncated,
                "critique": c.text}
               for p, c in zip(args.image, crits)]
    warn_truncated(sum(c.truncated for c in crits), len(crits), model=args.model)
    if args.json:
        print(json.dumps(results[0] if len(results) == 1 else results, indent=2))
        return 0
    for r in results:
        print(f"==== {r['image']}\n{r['critique'].strip()}\n---- scores")
        for d, s in r["scores"].items():
            print(f"  {DIMENSION_TITLES[d]:<28} {'N/A or unreadable' if s is None else f'{s:.2f}'}")
        print(
            f"  {'reward (0-1)':<28} {r['reward']:.3f}\n---- refined request\n  "
            f"{r['refined_request']}"
        )
        if r["truncated"]:
            print("  (the critique was cut by --max-new-tokens before it ended)")
    return 0


def eval_command(args: Args) -> int:
    """Preference accuracy on a pairs file, resumable in --out."""
    if not args.pairs:
        raise SystemExit(
            "eval needs --pairs FILE.jsonl (our pairs format) or --benchmark NAME (the paper's "
            f"Table 1: {', '.join(list(BENCHMARKS) + ['all'])})")
    pairs = read_pairs(args.pairs, args.limit)
    if args.out:
        # the settings bind a folder once it holds a prediction; a run that failed before its first
        # is no run
        if (Path(args.out) / "predictions.jsonl").is_file():
            check_same_run(args.out, args, EVAL_RUN_KEYS, paths=("pairs", "adapter"))
        save_args(args, args.out)
    scorer = RationalRewardsScorer.from_args(args)
    metrics = evaluate_preferences(scorer, pairs, args.mode, args.out, args.batch_size)
    print(json.dumps(metrics, indent=2))
    return 0


def benchmark_command(args: Args) -> int:
    """One benchmark of Table 1, or `all` of them (a benchmark without data is listed as not
    run)."""
    if args.pairs:
        raise SystemExit("eval takes --pairs FILE or --benchmark NAME, not both")
    names = list(BENCHMARKS) if args.benchmark == "all" else [args.benchmark]
    rows = []
    for name in names:
        try:
            rows.append(run_benchmark(name, args))
        except ModelLoadError as err:
            if args.benchmark != "all":
                raise
            rows.append({"benchmark": name, "paper": BENCHMARKS[name]["paper"], "error": str(err)})
    print_benchmark_table(rows)
    if not any("error" not in r for r in rows):
        raise ModelLoadError("no benchmark could be run (see the table above for each reason)")
    return 0

# =======================================================================================
# Plumbing. Nothing below is the paper: command-line parsing, files and datasets, model
# loading (VLMs and diffusers generators, tiny-random), and the two inference backends.
# =======================================================================================


# ---------------------------------------------------------------------------------------
# Command line: one flag per Args field, help text from the docstring under the field.
# Shared by every module of the project.
# ---------------------------------------------------------------------------------------
def _field_docs(cls) -> dict:
    """The docstring under each field, inherited fields (e.g. ScorerArgs) included."""
    docs = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):
        body = ast.parse(inspect.getsource(klass)).body[0].body
        for node, nxt in zip(body, body[1:]):
            is_doc = isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
            if isinstance(node, ast.AnnAssign) and is_doc:
                docs[node.target.id] = str(nxt.value.value)
    return docs


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default unless its help already says it (no "(default: X) (default:
    None)")."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, False, [], argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


def parse_args(cls, argv=None, description=None):
    """Parse `argv` into an instance of the dataclass `cls`.

    A field with metadata {"command": NAME} belongs to one subcommand: `score --help` lists only
    score's flags, and an eval flag given to score is an error rather than silently ignored.
    """
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    commands = {f.metadata.get("command") for f in dataclasses.fields(cls)} - {None}
    command = argv[0] if argv and argv[0] in commands else None
    parser = argparse.ArgumentParser(description=description, formatter_class=_HelpFormatter)
    docs, hints = _field_docs(cls), typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if command and f.metadata.get("command") not in (None, command):
            continue
        typ, kw = hints[f.name], {"help": docs.get(f.name, "")}
        if typing.get_origin(typ) is typing.Union:  # Optional[X]
            typ = [a for a in typing.get_args(typ) if a is not type(None)][0]
        if typing.get_origin(typ) is Literal:
            kw["choices"] = typing.get_args(typ)
            typ = type(kw["choices"][0])
        if typ is bool and f.name.startswith("no_"):
            kw["action"] = "store_true"  # --no-t5, not --no-t5/--no-no-t5
        elif typ is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif typ is list or typing.get_origin(typ) is list:
            # --image a b, and --image a --image b, both give [a, b]
            kw["nargs"], kw["action"] = "+", "extend"
        else:
            kw["type"] = typ
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if f.metadata.get("positional"):
            parser.add_argument(f.name, nargs="?", default=default, **kw)
        else:
            parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=default, **kw)
    return cls(**vars(parser.parse_args(argv)))  # fields of another command keep their defaults


def require_positive(args, *names) -> None:
    """Counts given on the command line must be >= 1 (None means "no limit" where allowed)."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be a positive number, got {value}")


def check_same_run(out_dir, args, keys, paths=(), extra=None) -> None:
    """Refuse to resume `out_dir` when it was written with other settings for any of `keys`.

    Without this, a rerun into the same directory with another model or mode would silently report
    the old outputs under the new settings. `paths`: keys compared as resolved paths; `extra`:
    values that are not flags (e.g. a digest of an input file's content), saved by save_args.
    """
    saved_path = Path(out_dir) / "args.json"
    if not saved_path.is_file():
        return
    try:
        saved = json.loads(saved_path.read_text())
    except json.JSONDecodeError:
        raise ValueError(
            f"{saved_path} is damaged (not JSON): delete {out_dir} to start over, or restore the "
            "file"
        ) from None
    now = {**dataclasses.asdict(args), **(extra or {})}
    keys = tuple(keys) + tuple(extra or ())

    def norm(k, v):
        return str(Path(v).resolve()) if k in paths and v else v

    def say(k):  # a flag by its name; a digest (no flag) by what it stands for
        if k in (extra or {}):
            return f"the content of the file(s) behind --{k.split('_')[0]} changed since then"
        return f"--{k.replace('_', '-')}: {saved.get(k)!r} then, {now[k]!r} now"
    diff = [say(k) for k in keys if norm(k, saved.get(k)) != norm(k, now[k])]
    if diff:
        raise ValueError(f"{out_dir} holds a run with other settings ({'; '.join(diff)}). "
                         f"Use another --out, or delete {out_dir} to start over.")


_held_locks = {}  # run folder -> its open lock file, held until the process ends


def lock_run_dir(out_dir) -> None:
    """Take an exclusive lock on the run folder for the rest of the process (fcntl.flock on
    out_dir/.lock, released by the OS however the process ends): a second run started into the
    same folder stops at once instead of writing the same checkpoint or paying for every
    judgement twice."""
    import fcntl
    key = str(Path(out_dir).resolve())
    if key in _held_locks:  # this process holds it already (the Python API called twice)
        return
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    handle = open(Path(out_dir) / ".lock", "w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise SystemExit(f"{out_dir} is in use by another run (the same command started twice?): "
                         "wait for it to end, or use another --out") from None
    _held_locks[key] = handle


def save_args(args, out_dir, extra=None) -> None:
    """args.json in the run folder, which from here on is this process's (`lock_run_dir`)."""
    lock_run_dir(out_dir)
    record = {**dataclasses.asdict(args), **(extra or {})}
    tmp = Path(out_dir) / "args.json.tmp"
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(Path(out_dir) / "args.json")


def cli_entry(main, errors=(), rerun: str = "run the same command again") -> None:
    """Run a module's main(); the errors a user can fix print one line `error: ...` and exit 2, as
    argparse's own do, never a traceback (SystemExit("message") included). Ctrl-C prints one line
    and exits 130: every file is written whole or not at all (atomic renames, whole JSONL lines),
    so the rerun continues where this one stopped."""
    try:
        code = main()
    except KeyboardInterrupt:
        print(f"\ninterrupted; {rerun} to continue", file=sys.stderr)
        sys.stdout.flush(), sys.stderr.flush()
        # not sys.exit: it would wait for HTTP worker threads still inside a request
        os._exit(130)
    except SystemExit as err:
        if not isinstance(err.code, str):
            raise
        print(f"error: {err.code}", file=sys.stderr)
        sys.exit(2)
    except (ModelLoadError, BackendError, FileNotFoundError, ValueError, *errors) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except OSError as err:
        # disk full, read-only folder, ...: what was written before is whole (atomic writes)
        where = f" ({err.filename})" if err.filename else ""
        print(
            f"error: {err.strerror or err}{where}. Everything written before this is kept: fix the "
            "cause and run the same command again to continue (rl_nft.py: with "
            "--resume)", file=sys.stderr)
        sys.exit(2)
    sys.exit(code)


def check_device(device: Optional[str]) -> None:
    """--device names a device torch knows and this machine has (cpu, cuda, cuda:N, mps)."""
    if device is None:
        return
    import torch
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise SystemExit(f"--device {device!r} is not a device: use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise SystemExit(f"--device {device}: no CUDA GPU is visible here; use --device cpu "
                             "(or leave --device out to pick a GPU when there is one)")
        if dev.index is not None and dev.index >= count:
            raise SystemExit(
                f"--device {device}: only {count} GPU(s) visible (cuda:0 to cuda:{count - 1})")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise SystemExit(
            f"--device {device}: MPS is not available on this machine; use --device cpu")


def check_common_args(args) -> None:
    """--timeout, --max-retries and --device, checked before any model is loaded."""
    check_device(getattr(args, "device", None))
    if not (args.timeout > 0 and math.isfinite(args.timeout)):
        raise SystemExit(f"--timeout must be a positive number of seconds, got {args.timeout}")
    if args.max_retries < 0:
        raise SystemExit(f"--max-retries must be 0 or more, got {args.max_retries}")


def check_writable_dir(path, flag: str = "--out") -> None:
    """The output folder exists as a folder we can write, or can be made: checked before loading
    anything."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise SystemExit(f"{flag} {path} is a file, not a directory")
    # nothing is created here
    existing = next(p for p in [path, *path.absolute().parents] if p.exists())
    if not existing.is_dir():
        raise SystemExit(f"{flag} {path}: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise SystemExit(f"cannot write to {flag} {path}: {existing} is not writable")

# ---------------------------------------------------------------------------------------
# Files: prompt lists, JSONL records, images (atomic writes), streamed parquet, fonts.
# ---------------------------------------------------------------------------------------
def read_prompt_records(path) -> list:
    """Generation prompts as records ({"prompt": ..., plus any other fields}) from a .txt (one per
    line; blank lines and # comments skipped) or a .jsonl (a `prompt` field per line)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"prompt file {path} not found (expected .txt, one prompt per line, or .jsonl with "
            "'prompt')"
        )
    records = []
    for n, line in enumerate(read_text_file(path).splitlines(), 1):
        if not line.strip() or (path.suffix != ".jsonl" and line.lstrip().startswith("#")):
            continue
        if path.suffix == ".jsonl":
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"{path}:{n}: not valid JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(rec, dict) or "prompt" not in rec:
                raise ValueError(
                    f"{path}:{n}: expected a JSON object with a 'prompt' field, got {line[:80]!r}")
            if not isinstance(rec["prompt"], str) or not rec["prompt"].strip():
                raise ValueError(
                    f"{path}:{n}: 'prompt' must be a non-empty string, got {rec['prompt']!r}")
            records.append({**rec, "prompt": rec["prompt"].strip(), "_line": n})
        else:
            records.append({"prompt": line.strip(), "_line": n})
    if not records:
        raise ValueError(f"{path} holds no prompts")
    return records


def read_text_file(path) -> str:
    """A text file's contents; a file that is not UTF-8 is a clear error naming it and the byte."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{path} is not UTF-8 text ({err.reason} at byte {err.start}); save it as UTF-8"
        ) from None


def read_prompt_list(path) -> list:
    """The prompts alone (rl_nft.py); gcr_loop.py reads the records for their source images and
    seeds."""
    return [r["prompt"] for r in read_prompt_records(path)]


def read_jsonl(path) -> list:
    """Records of a JSONL file written by `append_jsonl`; a torn last line (killed run) is cut
    off."""
    path = Path(path)
    if not path.is_file():
        return []
    raw = path.read_bytes()
    if raw and not raw.endswith(b"\n"):  # the process died mid-write: drop the partial record
        raw = raw[:raw.rfind(b"\n") + 1]
        path.write_bytes(raw)
    records = []
    for n, line in enumerate(raw.decode("utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            # a complete line that is not JSON is damage (not a killed write): say where,
            # skip nothing silently
            raise ValueError(
                f"{path}:{n} is not a JSON record ({line[:60]!r}); the file was damaged outside "
                "this program: fix or delete that line, then rerun") from None
    return records


def append_jsonl(path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _decode_rgb(source) -> tuple:
    """(RGB image, None) or (None, what is wrong) for a path or a file object; never raises."""
    try:
        with Image.open(source) as im:
            return im.convert("RGB"), None
    except Image.DecompressionBombError as err:
        # PIL refuses > ~179 MP: a decompression bomb or a giant scan
        return None, f"too large to decode ({err})"
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as err:
        return None, f"corrupt or not an image ({type(err).__name__})"


def read_image(path) -> tuple:
    """(RGB image, None), or (None, what is wrong): 'missing', 'corrupt ...' or 'too large ...'.

    Never raises for a bad file: callers skip and count it, naming the file and the problem.
    """
    if Path(path).is_dir():
        return None, "a folder, not an image file"
    return (None, "missing") if not Path(path).is_file() else _decode_rgb(path)


def load_image(path) -> Optional[Image.Image]:
    """RGB image, or None when the file is missing or not a readable image (callers count skips)."""
    return read_image(path)[0]


def save_image_atomic(image: Image.Image, path) -> None:
    """Write to a temporary name, then rename: a run killed mid-write leaves no truncated image
    under the real name for the next run to trust."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    image.save(tmp)
    os.replace(tmp, path)


def save_embedded_image(cell, path) -> Optional[str]:
    """Write a parquet image cell ({"bytes": ...}) to `path` as RGB PNG, atomically; reuse a valid
    earlier copy. Returns what is wrong ('missing', 'corrupt ...', 'too large ...') or None."""
    path = Path(path)
    if path.is_file() and load_image(path) is not None:  # written by an earlier, interrupted run
        return None
    if isinstance(cell, dict):     # the datasets library's image cell
        raw = cell.get("bytes")
    elif isinstance(cell, bytes):  # raw bytes
        raw = cell
    else:                          # None or anything else: no image
        raw = None
    if not raw:
        return "missing"
    image, problem = _decode_rgb(io.BytesIO(raw))
    if image is not None:
        save_image_atomic(image, path)
    return problem


def open_parquet_stream(source: str, split: str, image_columns, config: Optional[str] = None,
                        hint: str = ""):
    """A `datasets` stream over a hub dataset or a local parquet file/directory, so that a limit of
    N reads about N rows; image columns stay undecoded (one corrupt image is a skip, not a
    crash)."""
    import datasets
    local = Path(source).exists()
    if not local and not hub_reachable():
        raise ModelLoadError(
            f"cannot reach the Hugging Face hub to stream {source}. {hint}".strip())
    try:
        if local:
            files = [source]
            if Path(source).is_dir():
                files = sorted(str(p) for p in Path(source).rglob("*.parquet"))
            if not files:
                raise FileNotFoundError(f"no .parquet files under {source}")
            ds = datasets.load_dataset("parquet", data_files={split: files}, split=split,
                                       streaming=True)
        else:
            ds = datasets.load_dataset(source, config, split=split, streaming=True)
    except Exception as err:  # datasets raises many types for a missing repo/config/split/file
        raise ModelLoadError(f"could not open {source} ({config or 'default'}, split {split!r}): "
                             f"{type(err).__name__}: {err}. {hint}".strip()) from None
    # a column the data lacks is left alone: cast_column would add it as all-None, and the caller's
    # check for the columns it needs would then see "no image" in every row instead of an error
    present = ds.column_names
    for c in image_columns:
        if present is None or c in present:
            ds = ds.cast_column(c, datasets.Image(decode=False))
    return ds


def bound_pixels(image: Image.Image, max_pixels: int) -> Image.Image:
    w, h = image.size
    if w * h <= max_pixels:
        return image
    s = math.sqrt(max_pixels / (w * h))
    return image.resize((max(1, int(w * s)), max(1, int(h * s))), Image.BICUBIC)


def warn(message: str) -> None:
    """`warning: message` on stderr, written above any progress bar instead of inside it."""
    from tqdm import tqdm
    tqdm.write(f"warning: {message}", file=sys.stderr)


def wrap_text(text: str, width: int) -> list:
    """Lines of at most `width` characters, broken between words (a longer word gets a line of its
    own)."""
    return textwrap.wrap(" ".join((text or "").split()), width, break_long_words=False,
                         break_on_hyphens=False)


def fit_image(image: Image.Image, side: int) -> Image.Image:
    """`image` scaled so that its longer side is `side`, for pictures: small images (tiny-random's)
    are scaled up without smoothing, so their pixels stay visible; large ones are scaled down."""
    scale = side / max(image.size)
    size = (round(image.width * scale), round(image.height * scale))
    return image.resize(size, Image.NEAREST if scale > 1 else Image.BICUBIC)


def score_label(dim: str, score, not_applicable=()) -> str:
    """How every picture writes one score: the number, N/A (the critique said so) or unreadable."""
    if score is not None:
        value = f"{score:.1f}"
    else:
        value = "N/A" if dim in not_applicable else "unreadable"
    return f"{DIMENSION_TITLES[dim]}: {value}"


def slug(text: str, words: int = 5) -> str:
    """A short file-name-safe form of a prompt: 'three-red-apples-and-the'."""
    return "-".join(re.findall(r"[a-z0-9]+", (text or "").lower())[:words]) or "prompt"


def label_font(size: int):
    """Pillow's built-in font at `size` (for contact sheets and eval grids; no font files
    needed)."""
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()

# ---------------------------------------------------------------------------------------
# Model loading: one function for every module of the project.
# ---------------------------------------------------------------------------------------
class ModelLoadError(RuntimeError):
    """A model, adapter or dataset could not be found or loaded; the message says how to get it."""


def hub_reachable(timeout: float = 3.0) -> bool:
    """One quick TCP connect to the hub, so an offline machine fails in seconds instead of
    minutes of huggingface_hub retries; the answer is kept for the process, so checking a model
    and then loading it does not wait twice."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    return _probe_hub(os.environ.get("HF_ENDPOINT", "https://huggingface.co"), timeout)


@functools.lru_cache(maxsize=None)
def _probe_hub(endpoint: str, timeout: float) -> bool:
    url = urllib.parse.urlparse(endpoint)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                 timeout).close()
        return True
    except OSError:
        return False


def looks_like_path(name: str) -> bool:
    """A hub id is `name` or `owner/name`; anything else with a slash, a dot or a tilde in front is
    a path."""
    if name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name:
        return True
    return Path(name).exists()


def check_model_available(name: str, what: str = "model") -> None:
    """Fail fast, before any work, when `name` can be neither found locally nor downloaded.

    A path that does not exist says so (no hub advice); an uncached hub id on an offline
    machine gets the download command. A reachable hub is trusted here (loading reports
    a wrong id with its own error).
    """
    if name == "tiny-random":
        return
    if looks_like_path(name):
        if not Path(name).expanduser().is_dir():
            raise ModelLoadError(f"{what} path '{name}' does not exist (or is not a directory)")
        folder = Path(name).expanduser()
        if not (folder / "config.json").is_file() and not (folder / "model_index.json").is_file():
            raise ModelLoadError(f"{what} directory '{name}' holds no config.json or "
                                 "model_index.json: not a saved model")
        return
    if hub_reachable():
        return
    from huggingface_hub import try_to_load_from_cache
    cached = [try_to_load_from_cache(name, f) for f in ("config.json", "model_index.json")]
    if not any(isinstance(c, str) for c in cached):
        why = "the hub is not reachable and it is not in the local cache"
        raise ModelLoadError(_download_advice(name, what, why))


def _from_pretrained(load, name: str, path: str, what: str, **kwargs):
    """`load(path, **kwargs)` (a library's from_pretrained) for a hub id or a directory: offline it
    looks only in the local cache, files on disk load quietly, and a failure is one ModelLoadError
    that says what is missing and how to get it."""
    if not Path(path).is_dir() and not hub_reachable():
        kwargs["local_files_only"] = True  # the HF cache may still hold it
    try:
        with quiet_loading(Path(path).is_dir() or kwargs.get("local_files_only", False)):
            return load(path, **kwargs)
    except (OSError, ValueError) as err:
        if Path(path).is_dir():
            raise ModelLoadError(
                f"'{path}' exists but does not hold a loadable {what}: {err}") from err
        first_line = (str(err).splitlines() or [""])[0]
        why = ("it could not be fetched from the Hugging Face hub "
               f"({type(err).__name__}: {first_line})")
        raise ModelLoadError(_download_advice(name, what, why)) from None


# download sizes of the defaults, said next to their download commands (bf16 safetensors)
DOWNLOAD_SIZES = {
    "Qwen/Qwen3-VL-2B-Instruct": "about 4.3 GB",
    "Qwen/Qwen3-VL-8B-Instruct": "about 17.5 GB",
    "Qwen/Qwen3-VL-32B-Instruct": "about 67 GB",
    "TIGER-Lab/RationalRewards-8B-T2I": "about 17.5 GB",
    "TIGER-Lab/RationalRewards-8B-Edit": "about 17.5 GB",
    "stabilityai/stable-diffusion-3.5-medium": "about 16 GB (pipeline with T5)",
    "black-forest-labs/FLUX.1-Kontext-dev": "about 34 GB (pipeline with T5)"
}


def dataset_download_hint(hub_id: str, local: str, flag: str, use: Optional[str] = None) -> str:
    """How to get a hub dataset onto a machine without network: the download command, then the
    flag to pass (`use`: what to pass it, when not the download folder itself)."""
    return (f"On a machine with network run\n  hf download {hub_id} --repo-type dataset "
            f"--local-dir {local}\nand pass {flag} {use or local}.")


def _download_advice(name: str, what: str, why: str) -> str:
    local = f"models/{name.split('/')[-1]}"
    size = f" ({DOWNLOAD_SIZES[name]})" if name in DOWNLOAD_SIZES else ""
    return (
        f"Could not load {what} '{name}': {why}.\nOn a machine with network access run `hf "
        f"download {name} --local-dir {local}`{size} and pass {local} instead, or set HF_HOME to a "
        "cache that holds it. For an offline smoke run use tiny-random.")


def load_vlm(name: str, quantization: str = "auto", adapter: Optional[str] = None,
             device: Optional[str] = None, trainable: bool = False, seed: int = 0, dtype=None):
    """(model, processor) for a hub id, a local directory or `tiny-random`.

    quantization: auto (4-bit on GPU, none on CPU), 4bit (nf4, double quantization), 8bit, none.
    The vision tower and lm_head are never quantized. `adapter`: a peft LoRA directory.
    dtype: compute/storage dtype of unquantized weights; default bf16 on GPU, fp32 on CPU.
    """
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor, BitsAndBytesConfig

    check_model_available(name)
    path = str(tiny_vlm_dir(seed)) if name == "tiny-random" else name
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    if quantization == "auto":
        quantization = "4bit" if device.startswith("cuda") else "none"
    kwargs = {"dtype": dtype}
    if quantization == "4bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype, llm_int8_skip_modules=_NOT_QUANTIZED)
    elif quantization == "8bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True,
                                                           llm_int8_skip_modules=_NOT_QUANTIZED)
    elif quantization != "none":
        raise ValueError(f"quantization must be auto, 4bit, 8bit or none, got {quantization!r}")
    if quantization != "none":
        kwargs["device_map"] = {"": device}

    def both(p, **kw):
        offline = kw.get("local_files_only", False)
        return (AutoProcessor.from_pretrained(p, local_files_only=offline),
                AutoModelForImageTextToText.from_pretrained(p, **kw))
    processor, model = _from_pretrained(both, name, path, "model", **kwargs)
    if quantization == "none":
        model.to(device)
    if adapter is not None:
        from peft import PeftModel
        if not (Path(adapter) / "adapter_config.json").is_file():
            raise ModelLoadError(
                f"adapter directory '{adapter}' has no adapter_config.json (expected a peft LoRA "
                "saved by parrot.py or PeftModel.save_pretrained)")
        model = PeftModel.from_pretrained(model, adapter, is_trainable=trainable)
    processor.tokenizer.padding_side = "left"  # generation appends on the right
    return model if trainable else model.eval(), processor

# ---------------------------------------------------------------------------------------
# tiny-random models (a Qwen3-VL and an SD3 pipeline of the real architectures, built offline)
# and the generator loader. Every VLM width is a multiple of 64 so bitsandbytes 4-bit works on CPU.
# ---------------------------------------------------------------------------------------
_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|image_pad|>", "<|video_pad|>"
]
# The structure of Qwen's template: role turns, an image entry as vision_start/image_pad/vision_end.
_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Left in bf16 under 4/8-bit: transformers matches these as prefixes of full module names.
_NOT_QUANTIZED = ["model.visual", "lm_head"]
TINY_VERSION = 2  # bump when the tiny architecture changes, so cached copies are rebuilt


def build_tiny_vlm(seed: int = 0):
    """(model, processor): a randomly initialised Qwen3-VL, deterministic for `seed`."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (PreTrainedTokenizerFast, Qwen2VLImageProcessor, Qwen3VLConfig,
                              Qwen3VLForConditionalGeneration, Qwen3VLProcessor,
                              Qwen3VLVideoProcessor)

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=448, special_tokens=_SPECIAL_TOKENS,
                                  show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(sorted(p.read_text() for p in template_files()), trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>",
                                        additional_special_tokens=_SPECIAL_TOKENS[1:],
                                        chat_template=_CHAT_TEMPLATE)
    pixels = {"shortest_edge": 32 * 32, "longest_edge": 64 * 64}  # at most 4 image tokens per image
    patches = dict(patch_size=16, merge_size=2, temporal_patch_size=2, size=pixels)
    processor = Qwen3VLProcessor(image_processor=Qwen2VLImageProcessor(**patches),
                                 video_processor=Qwen3VLVideoProcessor(**patches),
                                 tokenizer=tokenizer, chat_template=_CHAT_TEMPLATE)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in _SPECIAL_TOKENS}
    config = Qwen3VLConfig(
        text_config=dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         max_position_embeddings=8192,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                          "mrope_section": [2, 3, 3], "mrope_interleaved": True},
                         pad_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"]),
        vision_config=dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2,
                           patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                           out_hidden_size=64, num_position_embeddings=64,
                           deepstack_visual_indexes=[0]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    return model, processor


@contextlib.contextmanager
def quiet_loading(local: bool = True):
    """Hide the libraries' per-shard loading bars and info logs while a model already on disk is
    loaded or saved; a hub download (local=False) keeps its progress bar."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog
    if not local:
        yield
        return
    levels = tlog.get_verbosity(), dlog.get_verbosity()
    tlog.disable_progress_bar(), dlog.disable_progress_bar()
    tlog.set_verbosity_error(), dlog.set_verbosity_error()
    try:
        yield
    finally:
        tlog.enable_progress_bar(), dlog.enable_progress_bar()
        tlog.set_verbosity(levels[0]), dlog.set_verbosity(levels[1])


def _tiny_dir(kind: str, build, seed: int) -> Path:
    """Directory of a saved tiny model, built by `build(seed) -> objects with save_pretrained` on
    first use; atomic, so parallel test workers and runs are safe."""
    root = Path(os.environ.get("RATIONALREWARDS_CACHE", Path.home() / ".cache" / "rationalrewards"))
    path = root / f"{kind}-seed{seed}"
    if not any(path.glob("*.json")):
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=".building-"))
        with quiet_loading():
            for part in build(seed):
                part.save_pretrained(tmp)
        try:
            tmp.rename(path)
        except OSError:  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def tiny_vlm_dir(seed: int = 0) -> Path:
    # the tokenizer is trained on the templates: editing one must rebuild the model
    text = "".join(sorted(p.read_text() for p in template_files()))
    corpus = hashlib.sha1(text.encode()).hexdigest()[:8]
    return _tiny_dir(f"tiny-random-qwen3vl-v{TINY_VERSION}-{corpus}", build_tiny_vlm, seed)


def _tiny_clip_tokenizer(max_length: int):
    """A character-level CLIP tokenizer (single characters and their `</w>` forms), offline."""
    from transformers import CLIPTokenizer
    chars = [chr(c) for c in range(33, 127)]
    tokens = ["<|startoftext|>", "<|endoftext|>"] + chars + [c + "</w>" for c in chars]
    vocab = {t: i for i, t in enumerate(tokens)}
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps(vocab))
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n")
        return CLIPTokenizer(str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"),
                             model_max_length=max_length)


def _tiny_vae(scaling_factor: float, shift_factor: float):
    """A two-level AutoencoderKL (x2 downsampling, 4 latent channels) with the model's latent
    normalisation."""
    from diffusers import AutoencoderKL
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                         block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8,
                         sample_size=64, use_quant_conv=False, use_post_quant_conv=False,
                         scaling_factor=scaling_factor, shift_factor=shift_factor)


def build_tiny_sd3(seed: int = 0):
    """A StableDiffusion3Pipeline of the real architecture, ~0.3M parameters, 64x64 images, offline.

    Two CLIP text encoders with a character-level tokenizer (no T5: the pipeline pads its share
    of the prompt embedding with zeros, as SD3 does with text_encoder_3=None), an SD3 transformer,
    a small VAE and the flow-matching Euler scheduler with SD3's shift of 3.
    """
    import torch
    from diffusers import (FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    tokenizer = _tiny_clip_tokenizer(77)
    torch.manual_seed(seed)
    clip = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                num_hidden_layers=2, num_attention_heads=4, projection_dim=32,
                max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    text_encoders = [CLIPTextModelWithProjection(CLIPTextConfig(**clip)).eval() for _ in range(2)]
    # inner width 4 heads x 16 = 64, so that bitsandbytes 4-bit works on CPU here too
    transformer = SD3Transformer2DModel(sample_size=32, patch_size=2, in_channels=4, out_channels=4,
                                        num_layers=2, attention_head_dim=16, num_attention_heads=4,
                                        joint_attention_dim=64, caption_projection_dim=64,
                                        pooled_projection_dim=64, pos_embed_max_size=64)
    vae = _tiny_vae(scaling_factor=1.5305, shift_factor=0.0609)  # SD3's latent normalisation
    pipe = StableDiffusion3Pipeline(transformer=transformer,
                                    scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
                                    text_encoder=text_encoders[0], tokenizer=tokenizer,
                                    text_encoder_2=text_encoders[1], tokenizer_2=tokenizer,
                                    text_encoder_3=None, tokenizer_3=None)
    return [pipe]


def build_tiny_kontext(seed: int = 0):
    """A FluxKontextPipeline of the real architecture (FLUX.1-Kontext-dev's structure), ~0.3M
    parameters, 64x64 images, offline.

    CLIP (pooled prompt) and T5 (token embeddings) encoders sharing a character-level tokenizer,
    a FLUX transformer with one double-stream and one single-stream block and the guidance
    embedding of the distilled -dev models, a small VAE with FLUX's latent normalisation, and the
    flow-matching scheduler with FLUX's resolution-dependent shift.
    """
    import torch
    from diffusers import (FlowMatchEulerDiscreteScheduler, FluxKontextPipeline,
                           FluxTransformer2DModel)
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    tokenizer = _tiny_clip_tokenizer(77)
    torch.manual_seed(seed)
    clip = CLIPTextModel(
        CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                       bos_token_id=0, eos_token_id=1, pad_token_id=1)).eval()
    t5 = T5EncoderModel(
        T5Config(vocab_size=len(tokenizer), d_model=64, d_kv=16, d_ff=128, num_layers=2,
                 num_heads=4, pad_token_id=1, eos_token_id=1)).eval()
    # 4 latent channels packed 2x2 -> 16 input features per token; rope axes 4 + 6 + 6 = head dim 16
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1,
                                         num_single_layers=1, attention_head_dim=16,
                                         num_attention_heads=4, joint_attention_dim=64,
                                         pooled_projection_dim=32, guidance_embeds=True,
                                         axes_dims_rope=(4, 6, 6))
    scheduler = FlowMatchEulerDiscreteScheduler(base_image_seq_len=256, base_shift=0.5,
                                                max_image_seq_len=4096, max_shift=1.15,
                                                use_dynamic_shifting=True, shift=3.0)
    vae = _tiny_vae(scaling_factor=0.3611, shift_factor=0.1159)
    pipe = FluxKontextPipeline(scheduler=scheduler, vae=vae,
                               text_encoder=clip, tokenizer=tokenizer, text_encoder_2=t5,
                               tokenizer_2=_tiny_clip_tokenizer(512), transformer=transformer)
    return [pipe]


def load_generator(name: str, task: str = "t2i", device: Optional[str] = None, dtype=None,
                   no_t5: bool = False, quantization: str = "none", seed: int = 0):
    """A diffusers pipeline for a hub id, a local directory or `tiny-random`, on `device`.

    task "t2i": a text-to-image pipeline (default SD3.5-Medium); tiny-random is a tiny SD3.
    task "edit": an image-conditioned pipeline (it takes `image=`, default FLUX.1-Kontext-dev);
    tiny-random is a tiny FLUX.1-Kontext. no_t5: leave SD3's T5 encoder out (about 9.5 GB in
    bf16 for SD3.5). quantization "4bit": the transformer and the T5 encoder in bitsandbytes nf4
    (how the 12B FLUX.1-Kontext-dev fits next to the scorer on 24 GB); "none": dtype throughout.
    """
    import torch
    from diffusers import DiffusionPipeline
    dimensions(task)
    check_model_available(name, "generator")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    kwargs = {"dtype": dtype}
    if quantization == "4bit":
        if not device.startswith("cuda"):
            raise ModelLoadError(
                "4-bit generator quantization needs a CUDA GPU (diffusers' bitsandbytes quantizer "
                "refuses to run on CPU); use --generator-quantization none here")
        from diffusers import PipelineQuantizationConfig
        kwargs["quantization_config"] = PipelineQuantizationConfig(
            # the transformer and the large text encoders (T5 is text_encoder_2 in FLUX,
            # text_encoder_3 in SD3); names a pipeline does not have are skipped by diffusers
            quant_backend="bitsandbytes_4bit",
            components_to_quantize=["transformer", "text_encoder_2", "text_encoder_3"],
            quant_kwargs={
                "load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": dtype
            })
    elif quantization != "none":
        raise ValueError(f"generator quantization must be none or 4bit, got {quantization!r}")
    if name == "tiny-random" and task == "edit":
        path = str(_tiny_dir(f"tiny-random-kontext-v{TINY_VERSION}", build_tiny_kontext, seed))
    elif name == "tiny-random":
        kwargs.update(text_encoder_3=None, tokenizer_3=None)
        path = str(_tiny_dir(f"tiny-random-sd3-v{TINY_VERSION}", build_tiny_sd3, seed))
    else:
        path = name
        if no_t5:
            kwargs.update(text_encoder_3=None, tokenizer_3=None)
    pipe = _from_pretrained(DiffusionPipeline.from_pretrained, name, path, "generator", **kwargs)
    pipe.set_progress_bar_config(disable=True)
    # quantized weights are placed at load
    return pipe if quantization == "4bit" else pipe.to(device)

# ---------------------------------------------------------------------------------------
# Backends: generate(messages_batch) -> texts, answer_logprobs(messages_batch, answers).
# ---------------------------------------------------------------------------------------
class TransformersBackend:
    """In-process generation with real batching (left padding, KV cache)."""

    def __init__(self, model, processor, batch_size: int = 8, max_pixels: int = 768 * 768):
        self.model, self.processor = model, processor
        self.batch_size, self.max_pixels = batch_size, max_pixels
        # Batches are padded on the left, whoever loaded the processor: generation appends on the
        # right, and answer_logprobs reads the last position, which right padding fills with pads.
        processor.tokenizer.padding_side = "left"

    def _inputs(self, messages_batch):
        def bound(part):
            if part["type"] != "image":
                return part
            return {**part, "image": bound_pixels(part["image"], self.max_pixels)}

        bounded = [[{**turn, "content": [bound(p) for p in turn["content"]]}
                    if isinstance(turn["content"], list) else turn for turn in conv]
                   for conv in messages_batch]
        return self.processor.apply_chat_template(
            bounded, add_generation_prompt=True, tokenize=True, return_dict=True,
            return_tensors="pt", processor_kwargs={"padding": True}).to(self.model.device)

    def generate(self, messages_batch, max_new_tokens=2048, temperature=0.1,
                 min_new_tokens=0) -> list:
        outs = self.generate_detailed(messages_batch, max_new_tokens, temperature, min_new_tokens)
        return [g.text for g in outs]

    def generate_detailed(self, messages_batch, max_new_tokens=2048, temperature=0.1,
                          min_new_tokens=0) -> list:
        import torch
        eos = self.model.generation_config.eos_token_id
        eos = torch.tensor([eos] if isinstance(eos, int) else list(eos or []))
        outs = []
        for i in range(0, len(messages_batch), self.batch_size):
            inputs = self._inputs(messages_batch[i:i + self.batch_size])
            sample = temperature > 0
            with torch.no_grad():
                out = self.model.generate(**inputs, max_new_tokens=max_new_tokens,
                                          min_new_tokens=min_new_tokens, do_sample=sample,
                                          temperature=temperature if sample else None, top_p=None,
                                          top_k=None)
            new_tokens = out[:, inputs["input_ids"].shape[1]:]  # (B, T_new)
            # a reply without an end token was cut by max_new_tokens
            if len(eos):
                ended = torch.isin(new_tokens.cpu(), eos).any(dim=1)
            else:
                ended = torch.zeros(len(new_tokens), dtype=torch.bool)
            texts = self.processor.batch_decode(new_tokens, skip_special_tokens=True)
            outs += [Generation(t, truncated=not bool(e)) for t, e in zip(texts, ended)]
        return outs

    def answer_logprobs(self, messages_batch, answers=("A", "B")) -> list:
        """log P(answer | prompt), normalised over `answers`, from one forward pass (no sampling).

        Each answer is scored by its first token, read at the position right after the
        generation prompt.
        """
        import torch
        tok = self.processor.tokenizer
        ids = [tok.encode(a, add_special_tokens=False)[0] for a in answers]
        results = []
        for i in range(0, len(messages_batch), self.batch_size):
            inputs = self._inputs(messages_batch[i:i + self.batch_size])
            with torch.no_grad():
                # only the last position's logits (B, 1, V): the full (B, T, V) tensor is large for
                # a 151k vocabulary
                out = self.model(**inputs, logits_to_keep=1, use_cache=False)
                logits = out.logits[:, -1, :].float()  # the next token's logits: (B, V)
            logp = torch.log_softmax(logits[:, ids], dim=-1)  # (B, len(answers))
            results += [dict(zip(answers, row.tolist())) for row in logp]
        return results


class BackendError(RuntimeError):
    """The model server failed or did not answer; the message says which and how often it was
    tried."""


@dataclass
class Generation:
    """One reply: its text, whether the token limit cut it (`finish_reason == "length"` over HTTP,
    no end token in-process), and the error when the request failed altogether (then text is "")."""
    text: str
    truncated: bool = False
    error: Optional[str] = None


def _data_url(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _not_a_chat_completion(body) -> Optional[str]:
    """What is wrong with a reply that should be a chat completion, or None when it is one."""
    if not isinstance(body, dict):
        return f"a JSON {type(body).__name__}, not an object"
    choices = body.get("choices")
    if not isinstance(choices, list) or not choices:
        return "no choices"
    if not isinstance(choices[0], dict) or not isinstance(choices[0].get("message"), dict):
        return "choices[0] has no message object"
    return None


class OpenAIBackend:
    """Chat completions over HTTP (vLLM, SGLang, hosted APIs); standard library only."""

    def __init__(self, api_base: str, model: str, api_key: Optional[str] = None,
                 timeout: float = 600.0, max_retries: int = 3, max_concurrency: int = 8,
                 max_pixels: int = 768 * 768, backoff: float = 1.0):
        self.url = api_base.rstrip("/") + "/chat/completions"
        self.model, self.api_key, self.timeout = model, api_key, timeout
        self.max_retries, self.max_concurrency = max_retries, max_concurrency
        self.max_pixels, self.backoff = max_pixels, backoff

    def _to_openai(self, conv) -> list:
        out = []
        for turn in conv:
            if isinstance(turn["content"], str):
                out.append(turn)
                continue
            parts = []
            for p in turn["content"]:
                if p["type"] == "image":
                    url = _data_url(bound_pixels(p["image"], self.max_pixels))
                    parts.append({"type": "image_url", "image_url": {"url": url}})
                else:
                    parts.append({"type": "text", "text": p["text"]})
            out.append({"role": turn["role"], "content": parts})
        return out

    def _post(self, payload: dict) -> dict:
        data = json.dumps(payload).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last = None
        for attempt in range(self.max_retries + 1):
            if attempt:
                delay = self.backoff * 2 ** (attempt - 1)
                # say so at once: with the defaults a dead server would otherwise stay silent
                # for many minutes
                warn(f"{self.url}: {last}; retry {attempt}/{self.max_retries} in {delay:g} s")
                time.sleep(delay)
            try:
                req = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    body = json.loads(resp.read())
                problem = _not_a_chat_completion(body)
                # the server answered, but not with a chat completion: retrying will not help
                if problem:
                    raise BackendError(
                        f"{self.url} answered with something that is not a chat completion "
                        f"({problem}): {json.dumps(body)[:300]}")
                return body
            except urllib.error.HTTPError as err:
                last = f"HTTP {err.code}: {err.read()[:300].decode(errors='replace')}"
                if err.code < 500 and err.code != 429:  # a bad request will not get better
                    break
            except (TimeoutError, OSError) as err:  # URLError, connection refused, socket timeout
                last = str(err)
                if "timed out" in last:
                    last = f"no answer within {self.timeout:g} s"
            except http.client.HTTPException as err:
                # a connection dropped mid-body, a non-HTTP status line
                last = f"broken HTTP response ({type(err).__name__}: {str(err)[:120]})"
            except json.JSONDecodeError as err:
                last = f"response is not JSON ({err})"
        raise BackendError(
            f"chat-completions request to {self.url} failed after {attempt + 1} attempt(s): {last}")

    def _map(self, fn, items) -> list:
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=self.max_concurrency)
        try:
            return list(pool.map(fn, items))
        finally:  # on Ctrl-C, do not wait for requests still in flight
            pool.shutdown(wait=False, cancel_futures=True)

    def generate(self, messages_batch, max_new_tokens=2048, temperature=0.1,
                 min_new_tokens=0) -> list:
        """Texts; a request that fails after its retries raises BackendError."""
        outs = self.generate_detailed(messages_batch, max_new_tokens, temperature, min_new_tokens)
        failed = [g.error for g in outs if g.error]
        if failed:
            raise BackendError(failed[0])
        return [g.text for g in outs]

    def generate_detailed(self, messages_batch, max_new_tokens=2048, temperature=0.1,
                          min_new_tokens=0) -> list:
        """[Generation]: a request that fails after its retries is a Generation with its error, so
        the others of the batch are kept (the caller decides whether a failure stops the run)."""
        def one(conv):
            try:
                resp = self._post({"model": self.model, "messages": self._to_openai(conv),
                                   "max_tokens": max_new_tokens, "temperature": temperature})
            except BackendError as err:
                return Generation("", error=str(err))
            choice = resp["choices"][0]
            content = choice["message"].get("content")
            truncated = choice.get("finish_reason") == "length"
            if not isinstance(content, str) or not content.strip():
                # counted downstream as an unreadable output; said here so it is not silent
                # (eval leaves such a pair out as the official scripts do; a reward counts it
                # unreadable)
                warn(f"{self.url} returned no text content ({str(content)[:80]!r})")
                return Generation("", truncated=truncated)
            return Generation(content, truncated=truncated)
        return self._map(one, messages_batch)

    def answer_logprobs(self, messages_batch, answers=("A", "B")) -> list:
        """log P(answer), normalised over `answers`, from the server's top logprobs; None when
        unreadable.

        An answer missing from the top-k list has at most the smallest probability listed, so it
        gets that logprob as an upper bound instead of zero mass by omission (which would turn
        P(A) = 0.135 into 1.0). A server without logprobs: the answer named in the text gets all
        the mass. Neither a listed answer nor a readable text: None, never a uniform guess, so
        Phase 2 drops the rationale for its own reason instead of passing it at P = 0.5.
        """
        def one(conv):
            resp = self._post({
                "model": self.model, "messages": self._to_openai(conv), "max_tokens": 1,
                "temperature": 0.0, "logprobs": True, "top_logprobs": 20
            })
            choice = resp["choices"][0]
            content = (choice.get("logprobs") or {}).get("content") or [{}]
            top = content[0].get("top_logprobs") or []
            top = [e for e in top
                   if isinstance(e, dict) and isinstance(e.get("logprob"), (int, float))]
            found = {}
            for entry in top:
                key = str(entry.get("token", "")).strip()
                if key in answers and key not in found:
                    found[key] = float(entry["logprob"])
            if found:
                floor = min(e["logprob"] for e in top)  # upper bound for an answer not in the list
                logp = {a: found.get(a, floor) for a in answers}
                total = math.log(sum(math.exp(v) for v in logp.values()))
                return {a: v - total for a, v in logp.items()}
            text = choice["message"].get("content") or ""
            m = re.search(r"\b(" + "|".join(map(re.escape, answers)) + r")\b", text)
            if not m:
                warn(f"teacher answer not readable as one of {answers}: {text[:80]!r}")
                return None
            return {a: (0.0 if a == m.group(1) else -math.inf) for a in answers}
        return self._map(one, messages_batch)


def load_backend(model: str, api_base: Optional[str] = None, adapter: Optional[str] = None,
                 quantization: str = "auto", batch_size: int = 8, max_pixels: int = 768 * 768,
                 timeout: float = 600.0, max_retries: int = 3, api_key_env: str = "OPENAI_API_KEY",
                 device: Optional[str] = None):
    if api_base:
        if adapter:
            raise ValueError(
                "--adapter applies to a local model; serve the adapter with your server instead "
                "(vLLM: --lora-modules)"
            )
        return OpenAIBackend(api_base, model, api_key=os.environ.get(api_key_env), timeout=timeout,
                             max_retries=max_retries, max_concurrency=batch_size,
                             max_pixels=max_pixels)
    vlm, processor = load_vlm(model, quantization, adapter, device=device)
    backend = TransformersBackend(vlm, processor, batch_size, max_pixels)
    backend.name = model  # for messages that mean nothing for tiny-random (truncation)
    return backend

def cli() -> None:
    """The `rationalrewards` command (pyproject.toml)."""
    cli_entry(main)


if __name__ == "__main__":
    cli()
