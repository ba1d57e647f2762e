"""Draw docs/watch_parrot.png, the README picture of "Watch PARROT work", from two finished runs:

    python docs/watch_parrot_picture.py runs/watch-parrot runs/watch-parrot-no-filter

(the README's command, and the same with --no-filter --epochs 2). Left: the student's held-out pairwise
accuracy per defect kind, before SFT, after it, and after the control's SFT on unfiltered
rationales. Right: one pair whose rationale Phase 2 kept and one whose rationale it dropped, the
toy teacher's failure named (a simulation: `--teacher toy` is no VLM). Plumbing, not the method:
it reads only what parrot.py wrote."""
import json
import sys
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from PIL import Image  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout's modules
import common  # noqa: E402

KINDS = {"physical_quality": "noise\n(physical quality)", "text_faithfulness":
         "colour or count\n(text faithfulness)", "text_rendering": "word\n(teacher's blind spot)"}


def example(run: Path, kept: bool) -> tuple:
    """The first pair whose rationale was kept, or the first dropped for a teacher failure."""
    phase1 = {(r["id"], r["candidate"]): r for r in common.read_jsonl(run / "phase1.jsonl")}
    for rec in common.read_jsonl(run / "phase2.jsonl"):
        pick = rec["candidate"] if rec["kept"] else rec["candidates"][-1]["candidate"]
        cand = next(c for c in rec["candidates"] if c["candidate"] == pick)
        z = phase1[(rec["id"], pick)]
        if rec["kept"] == kept and (kept or z.get("teacher_note") not in (None, "none")):
            what = (f"KEPT, P(y|x,z) = {cand['p_label']:.2f}" if kept else
                    f"DROPPED ({rec['reason']}): the toy's {z['teacher_note']}")
            return rec, z["rationale"], what
    raise SystemExit(f"{run}: no {'kept' if kept else 'dropped'} rationale to show")


def main(run: str, control: str, out: str = "docs/watch_parrot.png") -> None:
    run, control = Path(run), Path(control)
    student = json.loads((run / "report.json").read_text())["student"]
    nofilter = json.loads((control / "report.json").read_text())["student"]["after"]
    fig = plt.figure(figsize=(13, 5.4))
    ax = fig.add_axes([0.06, 0.14, 0.36, 0.74])
    bars = [("before SFT", student["before"], "#bbbbbb"), ("after SFT", student["after"], "#2a7"),
            ("after SFT, --no-filter", nofilter, "#d84")]
    for i, (label, stage, colour) in enumerate(bars):
        acc = stage["by_defect"]["pairwise"]
        drawn = ax.bar([k + 0.27 * (i - 1) for k in range(len(KINDS))],
                       [acc.get(d) or 0 for d in KINDS], 0.26, color=colour, label=label)
        ax.bar_label(drawn, labels=[f"{acc[d]:.2f}" if acc.get(d) is not None else "n/a"
                                    for d in KINDS], fontsize=7)
    ax.axhline(0.5, color="black", lw=0.8, ls="--")
    ax.text(len(KINDS) - 0.55, 0.51, "chance", fontsize=8, ha="right")
    ax.set(xticks=range(len(KINDS)), ylim=(0, 1.05), ylabel="held-out pairwise accuracy",
           title=f"the student, {student['heldout_pairs']} held-out pairs (ties count wrong)")
    ax.set_xticklabels(KINDS.values(), fontsize=8)
    overall = [stage["accuracy"]["pairwise"] or 0 for _, stage, _ in bars]
    ax.legend(fontsize=8, loc="upper right", title_fontsize=8,
              title="all pairs: " + ", ".join(f"{a:.2f}" for a in overall))
    for row, kept in enumerate((True, False)):
        rec, z, what = example(run, kept)
        y = 0.53 - 0.47 * row
        for j, side in enumerate(("image_a", "image_b")):
            im = fig.add_axes([0.47 + 0.105 * j, y, 0.1, 0.4])
            im.imshow(Image.open(rec[side]))  # as parrot.py wrote it: from where it ran
            im.set_axis_off()
            im.set_title(f"{'AB'[j]}{' (preferred)' if rec['label'] == 'AB'[j] else ''}",
                         fontsize=8)
        lines = [t for t in z.splitlines() if t.startswith(("1.", "2.", "## Score", "## Just"))]
        body = "\n".join(textwrap.shorten(t, 60) for t in lines[:10])
        fig.text(0.69, y + 0.38, f"{what}\n\"{textwrap.shorten(rec['prompt'], 55)}\"\n{body}",
                 fontsize=7.5, va="top", family="monospace")
    fig.suptitle("Watch PARROT work (a simulation): Phase 2 drops the toy teacher's failures, and "
                 "the student learns from what it keeps", fontsize=11)
    fig.savefig(out, dpi=80)
    print(f"wrote {out}")


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4):
        raise SystemExit(__doc__)
    main(*sys.argv[1:])
