"""The structure of prompts/*.txt, fact by fact, against the record in prompt_structure.json.

The templates follow the official prompts of TIGER-AI-Lab/RationalRewards point by point, in
their structure (turns, image list, section headers, rubric level names, methodology steps,
output skeleton, score placeholders); their instruction sentences are our own wording. The
released checkpoints were trained on that structure and our parser reads the skeleton's
header lines, so a change to any fact below is a change of format, not of wording.

Where each fact was checked in the official repository (HEAD of its git mirror):

- pointwise_t2i: README.md, section "vLLM Inference Templates and Parsing", `build_t2i_messages`:
  a system turn (`system_prompt`); the user text (`user_instruction`) starts
  `User Instruction: {prompt}`, then `You are provided with one image:` and
  `1. Generated Image <image>`; rubric of three aspects; methodology Anchor, Justify and Adjust;
  refinement paragraph; skeleton with `## Score: [ float score ]` and, for Text Rendering,
  `[ float score or N/A ]`, then `# User Request Refinement:`.
- pointwise_edit: README.md `build_i2i_messages` (`system_prompt`, `task_related_template` +
  "\n\n" + `common_task_guideline`), the same text as
  diffusion_rl_training/train_flux_kontext_rationalrewards.py `SYSTEM_PROMPT`,
  `TASK_RELATED_TEMPLATE`, `COMMON_TASK_GUIDELINE`, joined in `_create_scoring_message`:
  `You are provided with two images:`, `1. Source Image <image>`, `2. Edited Image <image>`,
  a line that points to the guidelines, four aspects with Image Faithfulness second.
- pairwise_t2i: reward_model_evaluation/rm_inference/inference_mmrb2_imggen.py `instruction`
  and `create_pairwise_evaluation_message` (its system turn is commented out, so there is one
  user turn whose first sentence gives the role; `User Instruction:` is its third line);
  methodology Anchor, Adjust, Compare; skeleton `## Score A:`, `## Score B:`, `## Winner:`.
- pairwise_edit: reward_model_evaluation/rm_inference/inference_mmrb2_imgedit.py `instruction`
  and `create_pairwise_evaluation_message` (system turn commented out): three images, four
  aspects, methodology Anchor, Justify and Adjust, Compare.
- anchored_pairwise_*, consistency_*, projection_*: no official counterpart was released
  (paper Appendix C/D, PARROT phases 1-3); they take the structure of the template named in
  their "source" entry, plus the `Human Preference:` line (anchored), the
  `### Judgement to Check` block (consistency) and the `### Reference Scores` block (projection).

The official text is not read at test time (the mirror is not available in CI):
prompt_structure.json is the record. PROMPTS_UNDER_TEST points the test at another folder of
templates (default: the repository's prompts/).
"""
import json
import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = Path(os.environ.get("PROMPTS_UNDER_TEST") or ROOT / "prompts")
RECORD = json.loads((Path(__file__).resolve().parent / "prompt_structure.json").read_text())
NAMES = sorted(RECORD)

# The line after which the output skeleton starts (all official templates but GCR's own word it
# so: README.md build_t2i_messages / build_i2i_messages, inference_mmrb2_img{gen,edit}.py).
OUTPUT_LINE = "Output your evaluation in the following format:"
RUBRIC_HEADER = "### Critical Aspects & Scoring Rubric"
METHOD_HEADER = "### Scoring Methodology (CRITICAL)"
# Strings the parser reads in the model's answer: they may appear only in the skeleton.
SKELETON_ONLY = ("## Score", "## Winner:", "## Justification:", "# Summary", "# Detailed Judgement",
                 "# User Request Analysis", "# User Request Refinement", "## Refinement Comments",
                 "## Refined Request")


def split_turns(text: str) -> dict:
    """`[system]` line, system text, `[user]` line, user text; without `[system]` all is user."""
    lines = text.split("\n")
    if lines[0].strip() != "[system]":
        return {"user": text}
    marks = [i for i, line in enumerate(lines) if line.strip() == "[user]"]
    assert len(marks) == 1, "a [system] template needs exactly one [user] line"
    return {"system": "\n".join(lines[1:marks[0]]), "user": "\n".join(lines[marks[0] + 1:])}


def prose_and_skeleton(user: str):
    """The user turn's lines before the output line, and the skeleton's lines after it."""
    lines = user.rstrip("\n").split("\n")
    if OUTPUT_LINE not in lines:
        return lines, None
    i = lines.index(OUTPUT_LINE)
    return lines[:i], lines[i + 1:]


def header_of(line: str) -> str:
    """A skeleton line without its placeholder: up to the first colon, or the whole line."""
    line = line.strip()
    return line[:line.index(":") + 1] if ":" in line else line


def section_lines(lines: list, header: str) -> list:
    """The lines under a `### ` header, up to the next `### ` header."""
    if header not in lines:
        return []
    out = []
    for line in lines[lines.index(header) + 1:]:
        if line.startswith("### "):
            break
        out.append(line)
    return out


def extract(text: str) -> dict:
    """The structural facts of one template (the keys of prompt_structure.json but "source")."""
    turns = split_turns(text)
    user = turns["user"]
    lines = user.split("\n")
    prose, skeleton = prose_and_skeleton(user)
    request_line = next((i for i, l in enumerate(lines) if l == "User Instruction: {request}"), None)
    image_lines = [i for i, l in enumerate(lines) if "<image>" in l]

    rubric = None
    block = section_lines(prose, RUBRIC_HEADER)
    if block:
        rubric = []
        for line in block:
            aspect = re.match(r"^\*\*(\d+)\. (.+?)\*\* \(.+\)$", line)
            level = re.match(r"^- \*\*(\d \([^)]+\)):\*\* \S", line)
            if aspect:
                rubric.append([aspect.group(2), []])
            elif level:
                rubric[-1][1].append(level.group(1))

    methodology = None
    block = section_lines(prose, METHOD_HEADER)
    if block:
        methodology = [m.group(2) for m in (re.match(r"^(\d+)\. \*\*(.+?):\*\* \S", l) for l in block) if m]

    sections = placeholders = winners = None
    if skeleton is not None:
        heads = [l for l in skeleton if l.startswith("#") or re.match(r"^\d+\.", l)]
        sections = [header_of(l) for l in heads]
        placeholders = [l.split(":", 1)[1].strip() for l in heads if re.match(r"^## Score( [AB])?:", l)]
        winners = [l.split(":", 1)[1].strip() for l in heads if l.startswith("## Winner:")] or None

    return {
        "turns": list(turns),
        "opening": {"first_line": lines[0] if lines[0] == "User Instruction: {request}" else None,
                    "request_line": request_line},
        "images": [lines[i].strip() for i in image_lines],
        "image_intro": lines[image_lines[0] - 1] if image_lines else None,
        "after_images": lines[image_lines[-1] + 1] if image_lines else None,
        "headers": [l for l in prose if l.startswith("### ")],
        "rubric": rubric,
        "methodology": methodology,
        "sections": sections,
        "placeholders": placeholders,
        "winners": winners,
        "fields": sorted(set(re.findall(r"\{([a-z_]+)\}", text))),
        "own_line_fields": sorted(l[1:-1] for l in lines if re.fullmatch(r"\{[a-z_]+\}", l)),
        "last_line": lines[-1] if lines[-1] else lines[-2],
    }


@pytest.fixture(scope="module", params=NAMES)
def template(request):
    path = PROMPTS / f"{request.param}.txt"
    assert path.is_file(), f"{path} is missing"
    return request.param, path.read_text()


FACTS = ["turns", "opening", "images", "image_intro", "after_images", "headers", "rubric",
         "methodology", "sections", "placeholders", "winners", "fields", "own_line_fields"]


@pytest.mark.parametrize("fact", FACTS)
def test_fact_matches_the_record(template, fact):
    # turns: README.md build_t2i_messages / build_i2i_messages return [system, user];
    #   inference_mmrb2_img{gen,edit}.py create_pairwise_evaluation_message return [user] only.
    # opening: build_t2i_messages' user_instruction and build_i2i_messages' task_related_template
    #   start `User Instruction: {prompt}`; inference_mmrb2_img*.py `instruction` starts with the
    #   role sentence, a blank line, then `User Instruction: {request}` (line 2).
    # images, image_intro: the `You are provided with ...` line and the numbered `<image>` lines
    #   right under the User Instruction line, in all four official templates.
    # after_images: blank in the official ones; `Human Preference: {preferred}` in ours (anchored).
    # headers: `### Critical Aspects & Scoring Rubric`, `### Scoring Methodology (CRITICAL)`.
    # rubric: the `**N. Aspect** (...)` lines and the `- **L (Level name):**` bullets.
    # methodology: `1. **Anchor:**`, `2. **Justify and Adjust:**` (README, mmrb2_imgedit) or
    #   `2. **Adjust:**` (mmrb2_imggen), `3. **Compare:**` (both mmrb2 files).
    # sections, placeholders, winners: the skeleton after `Output your evaluation in the
    #   following format:` in each official template.
    name, text = template
    assert extract(text)[fact] == RECORD[name][fact], f"{name}: {fact}"


def test_layout_around_the_request_line(template):
    # build_t2i_messages / build_i2i_messages: `User Instruction:` is the user turn's first line;
    # inference_mmrb2_img*.py `instruction`: one role sentence, a blank line, then it. In all of
    # them the image intro is the next line and the image lines follow without a gap.
    name, text = template
    lines = split_turns(text)["user"].split("\n")
    facts = extract(text)
    i = facts["opening"]["request_line"]
    assert i is not None, name
    if i:
        assert i == 2 and lines[1] == "" and lines[0].endswith(".") and "evaluator" in lines[0], name
    assert lines[i + 1] == facts["image_intro"], name
    assert lines[i + 2:i + 2 + len(facts["images"])] == facts["images"], name


def test_skeleton_strings_appear_only_in_the_skeleton(template):
    # tests/test_parsing.py counts `## Score:` / `## Winner:` per dimension: the prose and the
    # system turn must not hold them (nor the other header strings the parser reads).
    name, text = template
    turns = split_turns(text)
    prose, skeleton = prose_and_skeleton(turns["user"])
    outside = "\n".join(prose) + "\n" + turns.get("system", "")
    assert not [s for s in SKELETON_ONLY if s in outside], name
    if skeleton is not None:  # one Justification per dimension, each right under its title
        titles = [i for i, l in enumerate(skeleton) if re.match(r"^\d+\. .+:$", l)]
        assert titles and all(skeleton[i + 1].startswith("## Justification: [") for i in titles), name


def test_no_braces_but_the_fields(template):
    # rationalrewards.fill_prompt replaces `{name}` fields; any other brace would be a field.
    name, text = template
    assert not re.search(r"[{}]", re.sub(r"\{[a-z_]+\}", "", text)), name


def test_text_rendering_has_the_na_rule(template):
    # README.md / inference_mmrb2_img*.py: the Text Rendering rubric says to use N/A when no
    # text is requested, and its skeleton allows N/A.
    name, text = template
    prose, _ = prose_and_skeleton(split_turns(text)["user"])
    block = section_lines(prose, RUBRIC_HEADER)
    if not block:
        return
    start = next(i for i, l in enumerate(block) if "**" in l and "Text Rendering**" in l)
    assert "N/A" in "\n".join(block[start:]), name


def test_extra_blocks_sit_just_before_the_output_line(template):
    # anchored_pairwise_*: the instruction about the human label is the paragraph just before
    # the output line and names {preferred}; projection_*: `### Reference Scores` is the last
    # `### ` block and holds {anchor_scores}, {side}, {reference}; consistency_*: the file ends
    # with the answer instruction (the code reads the probability of the letter).
    name, text = template
    prose, skeleton = prose_and_skeleton(split_turns(text)["user"])
    if name.startswith("anchored_pairwise"):
        paragraph = "\n".join(prose).rstrip().split("\n\n")[-1]
        assert "{preferred}" in paragraph and "### " not in paragraph, name
    if name.startswith("projection"):
        block = "\n".join(section_lines(prose, "### Reference Scores"))
        assert all(f in block for f in ("{anchor_scores}", "Image {side}", "{reference}")), name
    if name.startswith("consistency"):
        assert skeleton is None and "A or B" in extract(text)["last_line"], name


def test_record_names_its_source():
    assert set(RECORD) == {f"{k}_{t}" for k in ("pointwise", "pairwise", "anchored_pairwise",
                                               "consistency", "projection") for t in ("t2i", "edit")}
    for name, facts in RECORD.items():
        assert facts["source"] and set(facts) == set(FACTS) | {"source"}, name
