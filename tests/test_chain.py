"""The README's whole-chain block, command by command, exactly as written there (only the
run directory is moved into the test's temporary directory). This is also the smoke test of
parrot.py and rl_nft.py: their README smoke commands are these with fewer flags."""
import csv
import json
import re
import shlex
from pathlib import Path

from conftest import ROOT, run_cli

import common


def chain_commands():
    block = re.search(r"<!-- chain -->\s*```bash\n(.*?)```\s*<!-- /chain -->",
                      (ROOT / "README.md").read_text(), re.S)
    assert block, "README.md lost its chain block"
    return [shlex.split(line) for line in block.group(1).splitlines() if line.strip()]


def test_readme_chain_runs_end_to_end(tmp_path):
    commands = chain_commands()
    scripts = [c[1] for c in commands]
    assert scripts == ["parrot.py", "rationalrewards.py", "rl_nft.py", "rl_nft.py", "gcr_loop.py"]
    runs = tmp_path / "runs"
    results = []
    for argv in commands:
        assert argv[0] == "python"
        argv = [a.replace("runs/chain", str(runs / "chain")) for a in argv[1:]]
        res = run_cli(*argv, fresh=True)  # each command in its own Python, as a user runs it
        assert res.returncode == 0, (argv[0], res.stderr[-3000:])
        assert "Traceback" not in res.stderr
        assert "cut by the token limit" not in res.stderr  # no warning meaningless for tiny-random
        results.append(res)
    parrot_out = runs / "chain" / "parrot"
    # 1. PARROT: every demo pair went through both phases; the student adapter exists either way
    report = json.loads((parrot_out / "report.json").read_text())
    assert report["raw_pairs"] == 16
    assert report["phase1_rationales"] == 16
    assert report["phase2_pairs"] == 16
    # every rationale that cannot be parsed is dropped for exactly that reason, before any
    # teacher check
    assert report["drops_by_reason"]["unparseable"] == report["phase1_parse_failures"]
    assert report["elbo_term1_candidates_scored"] + report["unreadable_teacher_answers"] == 16
    for name in ("args.json", "inputs.json", "phase1.jsonl", "phase2.jsonl", "sft.jsonl",
                 "heldout.jsonl", "heldout_pairs.jsonl", "student/adapter_config.json"):
        assert (parrot_out / name).is_file(), name
    assert "PARROT report" in results[0].stdout
    assert "phase 1: anchored generation" in results[0].stderr
    if report["kept"] == 0:
        assert "untrained adapter" in results[0].stderr
    # 2. eval of the student on the held-out pairs, which share no prompt with the SFT data
    held = common.read_jsonl(parrot_out / "heldout_pairs.jsonl")
    # relative to the file, as the format says
    assert all(not Path(r["image_a"]).is_absolute() for r in held)
    # demo: the attribution accuracy is always reported, None ("none kept") when no rationale
    # survived
    assert "attribution_accuracy" in report
    assert (report["kept"] > 0) == (report["attribution_accuracy"] is not None)
    sft_ids = {s["id"] for s in common.read_jsonl(parrot_out / "sft.jsonl")}
    assert held and not {p["id"] for p in held} & sft_ids
    metrics = json.loads((runs / "chain" / "eval" / "metrics.json").read_text())
    assert metrics["pairs"] == len(held) and metrics["mode"] == "pairwise"
    # 3. RL with the student as the reward: the smoke run of rl_nft.py
    with open(runs / "chain" / "nft" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    # one optimiser step per epoch
    assert [r["epoch"] for r in rows] == ["1", "2"] and rows[-1]["step"] == "2"
    # tiny-random writes noise, mostly unreadable (its tokens hold template phrases, so now and then
    # a "Score: 4"): counted, not a crash
    assert all(8 <= int(r["unreadable"]) <= 16 for r in rows), rows
    nft = runs / "chain" / "nft"
    assert json.loads((nft / "args.json").read_text())["scorer_adapter"].endswith("student")
    assert (nft / "checkpoint.pt").is_file()
    assert (nft / "lora" / "epoch_0002" / "pytorch_lora_weights.safetensors").is_file()
    assert "Loading weights" not in results[2].stderr  # library loading bars are kept quiet
    # 3b. editing RL on the tiny FLUX.1-Kontext: four dimensions logged, the official mask's counts
    # (tiny-random rewards are mostly 0 and barely vary, so the mask takes most samples; the mask's
    # logic itself is tested on hand-made rewards in test_rl_nft.py)
    with open(runs / "chain" / "nft-edit" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["1", "2"] and "image_faithfulness" in rows[0]
    assert all(int(r["masked_samples"]) + int(r["trained_samples"]) == 16 for r in rows), rows
    assert all(int(r["banned_prompts"]) == 0 for r in rows), rows  # no group mean reaches 0.9
    assert (runs / "chain" / "nft-edit" / "eval" / "epoch_0002.png").is_file()
    # 4. GCR with the student as the critic
    recs = common.read_jsonl(runs / "chain" / "gcr" / "gcr.jsonl")
    assert len(recs) == 4 and "GCR over 4 prompts" in results[4].stdout
