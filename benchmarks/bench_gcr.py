"""GCR vs plain generation on the same prompts: model calls and wall time per prompt.

Plain generation is one pipeline call per batch of prompts. GCR adds one critique per round
and one generation per refinement, so with --rounds 1 it makes at most 2 generations and 2
critiques per prompt. Two scorers, both tiny-random generators:
  * tiny-random scorer: its critiques are unreadable, so no prompt refines (the cheapest case);
  * a scripted scorer that always fails the gate and always writes a refined request (the
    most expensive case for the given --rounds).

    python benchmarks/bench_gcr.py          # about 30 s on 2 CPU cores
"""
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import gcr_loop  # noqa: E402
import common
import rationalrewards as rr  # noqa: E402

PROMPTS = [r["prompt"] for r in common.read_prompt_records(
    Path(__file__).resolve().parents[1] / "prompts" / "gcr_demo_prompts.txt")] * 2
ALWAYS_LOW = ("1. Text Faithfulness:\n## Score: 2\n2. Physical and Visual Quality:\n## Score: 2\n"
              "3. Text Rendering:\n## Score: N/A\n# User Request Refinement:\n"
              "## Refined Request: a clearer version of the request\n")


class Counting:
    """Counts calls (and items) going through a pipeline or a scorer backend."""

    def __init__(self, inner):
        self.inner, self.calls, self.items = inner, 0, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)


class CountingPipe(Counting):
    def __call__(self, prompt, **kw):
        self.calls, self.items = self.calls + 1, self.items + len(prompt)
        return self.inner(prompt=prompt, **kw)


class CountingBackend(Counting):
    def generate(self, batch, *a, **k):
        self.calls, self.items = self.calls + 1, self.items + len(batch)
        return self.inner.generate(batch, *a, **k)


class AlwaysLow:
    batch_size = 8

    def generate(self, batch, *a, **k):
        return [ALWAYS_LOW] * len(batch)


def run_gcr(pipe, backend, rounds):
    args = gcr_loop.Args(prompt="x", steps=4, resolution=64, rounds=rounds, batch_size=4)
    pipe, backend = CountingPipe(pipe), CountingBackend(backend)
    scorer = rr.RationalRewardsScorer(backend, "t2i", max_new_tokens=128)
    out = Path(tempfile.mkdtemp())
    (out / "images").mkdir()
    items = [{"id": f"p{i}", "prompt": p, "source_image": None, "seed": i}
             for i, p in enumerate(PROMPTS)]
    t0 = time.perf_counter()
    for i in range(0, len(items), args.batch_size):
        gcr_loop.run_batch(pipe, scorer, items[i:i + args.batch_size], args,
                           ("text_faithfulness", "physical_quality"), None, out)
    seconds = time.perf_counter() - t0
    shutil.rmtree(out)
    return seconds / len(items), pipe.items / len(items), backend.items / len(items)


def run_plain(pipe):
    args = gcr_loop.Args(prompt="x", steps=4, resolution=64)
    t0 = time.perf_counter()
    for i in range(0, len(PROMPTS), 4):
        gcr_loop.generate(pipe, PROMPTS[i:i + 4],
                          list(range(i, i + 4))[:len(PROMPTS[i:i + 4])], [None] * 4, args)
    return (time.perf_counter() - t0) / len(PROMPTS)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    pipe = common.load_generator("tiny-random")
    model, processor = common.load_vlm("tiny-random")
    tiny = common.TransformersBackend(model, processor, batch_size=8)
    run_plain(pipe)  # warm-up
    plain = run_plain(pipe)
    print(f"{len(PROMPTS)} prompts, batches of 4, tiny-random generator (4 steps, 64 px)\n")
    print(
        f"{'setting':<42} {'gen/prompt':>10} {'critiques/prompt':>17} {'s/prompt':>9} "
        f"{'x plain':>8}"
    )
    print(f"{'plain generation':<42} {1.0:>10.2f} {0.0:>17.2f} {plain:>9.3f} {1.0:>8.2f}")
    for name, backend, rounds in (("GCR, tiny-random scorer (no refinement)", tiny, 1),
                                  ("GCR, always-refine scorer, --rounds 1", AlwaysLow(), 1),
                                  ("GCR, always-refine scorer, --rounds 3", AlwaysLow(), 3)):
        sec, gens, crits = run_gcr(pipe, backend, rounds)
        bound = "ok" if gens <= rounds + 1 and crits <= rounds + 1 else "OVER"
        print(f"{name:<42} {gens:>10.2f} {crits:>17.2f} {sec:>9.3f} {sec / plain:>8.2f}  "
              f"(bound {rounds + 1} and {rounds + 1}: {bound})")
