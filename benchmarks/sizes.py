"""The size budget of DESIGN.md, measured: lines per module, the longest line, and the share of
each of the four modules above its "The method ends here" banner; README and docs/ characters.

    python benchmarks/sizes.py
"""
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODULES = ["common.py", "rationalrewards.py", "parrot.py", "rl_nft.py", "gcr_loop.py"]
BUDGET, PER_FILE = 3200, 1000  # 3,000 without multi-process training

total = 0
for name in MODULES:
    lines = (ROOT / name).read_text().splitlines()
    total += len(lines)
    banner = next((i for i, line in enumerate(lines) if "The method ends here" in line), None)
    share = "plumbing" if banner is None else f"method block {100 * banner / len(lines):.0f}%"
    over = "  OVER" if len(lines) > PER_FILE else ""
    print(f"{name:20s} {len(lines):5d} lines  longest {max(map(len, lines)):3d}  {share}{over}")
print(f"{'total':20s} {total:5d} lines (budget {BUDGET})")
for name in ["README.md", "docs/REFERENCE.md"]:
    print(f"{name:20s} {len((ROOT / name).read_text()):5d} characters")
