"""The size budget of DESIGN.md, measured: lines per module, the longest line, the share of each of
the four modules above its "The method ends here" banner, and what the lines are (code,
docstrings, comments, blank); README and docs/ characters.

    python benchmarks/sizes.py
"""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODULES = ["common.py", "rationalrewards.py", "parrot.py", "rl_nft.py", "gcr_loop.py"]
BUDGET, PER_FILE = 3200, 1000  # 3,000 without multi-process training


def kinds(text: str) -> dict:
    """Lines by kind: docstring (module, class, function and attribute docstrings), comment,
    blank, and the rest (code)."""
    lines = text.splitlines()
    doc = set()
    for node in ast.walk(ast.parse(text)):
        body = getattr(node, "body", None)
        for stmt in body if isinstance(body, list) else []:
            if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant) \
                    and isinstance(stmt.value.value, str):
                doc.update(range(stmt.lineno, stmt.end_lineno + 1))
    comment = {i for i, line in enumerate(lines, 1) if line.strip().startswith("#")} - doc
    blank = {i for i, line in enumerate(lines, 1) if not line.strip()} - doc
    return {"code": len(lines) - len(doc | comment | blank), "doc": len(doc),
            "comment": len(comment), "blank": len(blank)}


totals = dict.fromkeys(("lines", "code", "doc", "comment", "blank"), 0)
for name in MODULES:
    text = (ROOT / name).read_text()
    lines = text.splitlines()
    banner = next((i for i, line in enumerate(lines) if "The method ends here" in line), None)
    # the method block: the lines above the banner's first rule line
    share = "plumbing        " if banner is None else \
        f"method block {100 * (banner - 1) / len(lines):3.0f}%"
    over = "  OVER" if len(lines) > PER_FILE or (banner and 2 * (banner - 1) < len(lines)) else ""
    k = kinds(text)
    for key, value in {"lines": len(lines), **k}.items():
        totals[key] += value
    print(f"{name:20s} {len(lines):5d} lines  longest {max(map(len, lines)):3d}  {share}  "
          f"code {k['code']:4d} doc {k['doc']:4d} comment {k['comment']:3d} "
          f"blank {k['blank']:3d}{over}")
print(f"{'total':20s} {totals['lines']:5d} lines (budget {BUDGET})  code {totals['code']}, "
      f"docstrings {totals['doc']}, comments {totals['comment']}, blank {totals['blank']}")
for name in ["README.md", "docs/REFERENCE.md"]:
    print(f"{name:20s} {len((ROOT / name).read_text()):5d} characters")
