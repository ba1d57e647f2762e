"""Measurements for PARROT (parrot.py), printed side by side in one run.

(a) Phase 2: P(y|x,z) by one forward pass (`answer_logprobs`) vs by generating the answer
    (greedy, 1 and 8 new tokens), same consistency prompts, same model: tiny-random and a
    random Qwen3-VL of about 100M parameters. The forward pass yields a probability rather
    than a sample and must not be slower.
(b) Phase 1: anchored rationales per second at batch 8 vs batch 1 on tiny-random, same number
    of new tokens in both. Target: >= 3x.
(c) Wall time of the whole demo smoke run (subprocess, as a user runs it).

    python benchmarks/bench_parrot.py        # about two minutes on 2 CPU cores
"""
import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import parrot  # noqa: E402
import common
import rationalrewards as rr  # noqa: E402


def random_100m():
    """A Qwen3-VL of ~100M parameters with the tiny tokenizer (same vocabulary and special
    tokens)."""
    from transformers import Qwen3VLForConditionalGeneration
    tiny, processor = common.build_tiny("qwen3vl", 0)
    config = tiny.config
    config.text_config.update(dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                                   num_attention_heads=12, num_key_value_heads=4, head_dim=64))
    config.text_config.rope_parameters["mrope_section"] = [12, 10, 10]  # sums to head_dim / 2
    config.vision_config.update(
        dict(depth=4, hidden_size=512, intermediate_size=1024, num_heads=8, out_hidden_size=768))
    torch.manual_seed(0)
    model = Qwen3VLForConditionalGeneration(config).eval()
    processor.tokenizer.padding_side = "left"
    return model, processor


def demo_records(n):
    with tempfile.TemporaryDirectory() as tmp:
        pairs = [parrot.demo_pair(i, 0, Path(tmp)) for i in range(n)]
        imgs = [parrot.images_of(p, "image_a", "image_b") for p in pairs]
    return pairs, imgs


def consistency(name, model, processor, n=16, repeats=3):
    pairs, imgs = demo_records(n)
    z = (
        "# Detailed Judgement\n1. Text Faithfulness:\n## Justification: A matches the request, B "
        "does not.\n## Score A: 4\n## Score B: 2\n## Winner: Image A\n# Summary: A wins.")
    def msgs():
        return [rr.render_messages("consistency_t2i", im, request=p["prompt"], rationale=z)
                for p, im in zip(pairs, imgs)]

    backend = common.TransformersBackend(model, processor, batch_size=8, max_pixels=256 * 256)
    backend.answer_logprobs(msgs()[:2])  # warm-up
    methods = {"forward": lambda: backend.answer_logprobs(msgs()),
               "generate 1": lambda: backend.generate(msgs(), max_new_tokens=1, temperature=0.0),
               "generate 8": lambda: backend.generate(msgs(), max_new_tokens=8, min_new_tokens=8,
                                                      temperature=0.0)}
    t = {k: float("inf") for k in methods}
    for _ in range(repeats):  # interleaved rounds, best of each: a 2-core machine is noisy
        for label, fn in methods.items():
            start = time.perf_counter()
            fn()
            t[label] = min(t[label], time.perf_counter() - start)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"    {name:<22} {params:>7.1f}M  forward {t['forward']:6.2f}s  generate(1) "
          f"{t['generate 1']:6.2f}s  generate(8) {t['generate 8']:6.2f}s  forward/generate(1) "
          f"{t['forward'] / t['generate 1']:.2f}  forward/generate(8) "
          f"{t['forward'] / t['generate 8']:.2f}")


def phase1_throughput(new_tokens, n=8):
    model, processor = common.load_vlm("tiny-random")
    pairs, imgs = demo_records(n)
    msgs = [rr.render_messages("anchored_pairwise_t2i", im, request=p["prompt"],
                               preferred=f"Image {p['label']}")
            for p, im in zip(pairs, imgs)]
    t = {}
    for bs in (1, 8):
        backend = common.TransformersBackend(model, processor, batch_size=bs)
        backend.generate(msgs[:bs], max_new_tokens=2)  # warm-up
        start = time.perf_counter()
        backend.generate(msgs, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         temperature=0.7)
        t[bs] = time.perf_counter() - start
    print(f"(b) Phase 1 on tiny-random, {n} pairs x {new_tokens} new tokens")
    print(
        f"    pairs / second: batch 1 {n / t[1]:.2f}, batch 8 {n / t[8]:.2f}, speed-up "
        f"{t[1] / t[8]:.2f}x (target >= 3)"
    )


def smoke_wall_time():
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "parrot.py", "--dataset", "demo", "--limit", "16", "--teacher",
               "tiny-random", "--student", "tiny-random", "--out", str(Path(tmp) / "smoke")]
        start = time.perf_counter()
        res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        wall = time.perf_counter() - start
    status = "ok" if res.returncode == 0 else f"FAILED ({res.returncode})"
    print(f"(c) demo smoke run ({' '.join(cmd[1:])}): {wall:.1f} s wall, {status}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--new-tokens", type=int, default=64, help="new tokens per rationale in (b)")
    ap.add_argument("--skip-100m", action="store_true", help="only tiny-random in (a)")
    a = ap.parse_args()
    print("(a) Phase 2 consistency, 16 pairs, batch 8: one forward pass vs generating the answer")
    consistency("tiny-random", *common.load_vlm("tiny-random"))
    if not a.skip_100m:
        consistency("random Qwen3-VL ~100M", *random_100m())
    phase1_throughput(a.new_tokens)
    smoke_wall_time()
