"""Measurements for the core (rationalrewards.py), printed side by side in one run.

(a) Memory: bytes per parameter of the quantized linear layers at 4-bit nf4 (double
    quantization, as `load_vlm` loads them) vs bf16, measured on a randomly initialised
    Qwen3-VL with the real Qwen3-VL-8B layer shapes but only `--layers` decoder layers and one
    vision block. From those measured figures: the footprint of the full 8B scorer's weights in
    each setting (parameter counts of the full model come from its config on the meta device).
    Target: 4-bit / bf16 ratio <= 0.30.
(b) Speed: critique throughput at batch 8 vs batch 1 on tiny-random, with the same number
    of new tokens in both (min_new_tokens = max_new_tokens). Target: >= 3x.

    python benchmarks/bench_core.py            # both, about a minute on 2 CPU cores
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common
import rationalrewards as rr  # noqa: E402

# Qwen3-VL-8B-Instruct shapes (config.json of the hub checkpoint).
TEXT_8B = dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
               num_attention_heads=32, num_key_value_heads=8, head_dim=128,
               max_position_embeddings=262144,
               rope_parameters={"rope_type": "default", "rope_theta": 5000000.0,
                                "mrope_section": [24, 20, 20], "mrope_interleaved": True})
VISION_8B = dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, patch_size=16,
                 spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=4096,
                 num_position_embeddings=2304, deepstack_visual_indexes=[8, 16, 24])


def config(layers, vision_depth, vocab):
    from transformers import Qwen3VLConfig
    text = {**TEXT_8B, "num_hidden_layers": layers, "vocab_size": vocab}
    deepstack = VISION_8B["deepstack_visual_indexes"] if vision_depth > 24 else [0]
    vision = {**VISION_8B, "depth": vision_depth, "deepstack_visual_indexes": deepstack}
    return Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False)


def decoder_linear_bytes(model):
    """(parameters, bytes) of every linear layer inside the decoder layers, as stored."""
    import bitsandbytes as bnb
    n_params = n_bytes = 0
    for name, mod in model.named_modules():
        if ".language_model.layers." not in name:
            continue
        if isinstance(mod, bnb.nn.Linear4bit):
            qs = mod.weight.quant_state
            n_params += mod.in_features * mod.out_features
            n_bytes += mod.weight.numel() * mod.weight.element_size()  # packed 4-bit codes
            n_bytes += qs.absmax.numel() * qs.absmax.element_size() + qs.code.numel(
            ) * qs.code.element_size()
            if qs.nested:  # double quantization stores the absmax of the absmax
                n_bytes += qs.state2.absmax.numel() * qs.state2.absmax.element_size()
                n_bytes += qs.state2.code.numel() * qs.state2.code.element_size()
        elif type(mod) is torch.nn.Linear:
            n_params += mod.weight.numel()
            n_bytes += mod.weight.numel() * mod.weight.element_size()
    return n_params, n_bytes


def memory(layers):
    from transformers import Qwen3VLForConditionalGeneration
    print(
        f"(a) building a random Qwen3-VL with 8B layer shapes, {layers} decoder layer(s), 1 vision "
        "block ..."
    )
    torch.manual_seed(0)
    small = Qwen3VLForConditionalGeneration(config(layers, 1, vocab=1024)).to(torch.bfloat16)
    with tempfile.TemporaryDirectory() as tmp:
        small.save_pretrained(tmp)
        del small
        from transformers import AutoProcessor  # load_vlm loads a processor too; the tiny one does
        AutoProcessor.from_pretrained(common.tiny_dir("qwen3vl")).save_pretrained(tmp)
        bf16, _ = rr_load(tmp, "none")
        p16, b16 = decoder_linear_bytes(bf16)
        del bf16
        q4, _ = rr_load(tmp, "4bit")
        p4, b4 = decoder_linear_bytes(q4)
        del q4
    assert p4 == p16
    bpp16, bpp4 = b16 / p16, b4 / p4

    # Parameter counts of the full 8B model, without allocating it.
    with torch.device("meta"):
        full = Qwen3VLForConditionalGeneration(config(36, 27, vocab=TEXT_8B["vocab_size"]))
    total = sum(p.numel() for p in full.parameters())
    linear = sum(m.weight.numel() for n, m in full.named_modules()
                 if ".language_model.layers." in n and isinstance(m, torch.nn.Linear))
    rest = total - linear  # embeddings, lm_head, norms, vision tower: kept in bf16 under 4-bit
    gb = 1e9
    foot16 = total * bpp16 / gb
    foot4 = (linear * bpp4 + rest * 2) / gb
    print(f"    decoder linear layers measured: {p16 / 1e6:.1f}M parameters")
    print(f"    {'':24} {'bf16':>10} {'4-bit nf4':>10} {'ratio':>8}")
    print(
        f"    {'bytes / parameter':24} {bpp16:>10.3f} {bpp4:>10.3f} {bpp4 / bpp16:>8.3f}   (target "
        "<= 0.30)"
    )
    print(
        f"    full Qwen3-VL-8B scorer: {total / 1e9:.2f}B parameters, {linear / 1e9:.2f}B in "
        "quantizable decoder linears"
    )
    print(
        f"    {'weights of the 8B scorer':24} {foot16:>9.1f}G {foot4:>9.1f}G {foot4 / foot16:>8.3f}"
    )
    for card in (16, 24):
        print(f"    on a {card} GB card, left for a generator, activations and KV cache: "
              f"bf16 {card - foot16:5.1f} GB, 4-bit {card - foot4:5.1f} GB")
    return bpp4 / bpp16


def rr_load(path, quant):
    # bf16, as on a GPU
    return common.load_vlm(path, quantization=quant, device="cpu", dtype=torch.bfloat16)


def throughput(new_tokens, n_prompts=8):
    from PIL import Image
    model, processor = common.load_vlm("tiny-random")
    msgs = [rr.render_messages("pointwise_t2i", [Image.new("RGB", (64, 64), c)],
                               request=f"a {c} square number {i}")
            for i, c in enumerate(["red", "blue", "green", "white"] * (n_prompts // 4))]
    times = {}
    for bs in (1, 8):
        backend = common.TransformersBackend(model, processor, batch_size=bs)
        backend.generate(msgs[:bs], max_new_tokens=4, temperature=0.0)  # warm-up
        start = time.perf_counter()
        backend.generate(msgs, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         temperature=0.1)
        times[bs] = time.perf_counter() - start
    print(f"(b) tiny-random, {n_prompts} critiques x {new_tokens} new tokens each")
    print(f"    {'':24} {'batch 1':>10} {'batch 8':>10} {'speed-up':>8}")
    print(
        f"    {'critiques / second':24} {n_prompts / times[1]:>10.2f} "
        f"{n_prompts / times[8]:>10.2f} {times[1] / times[8]:>8.2f}   (target >= 3)")
    return times[1] / times[8]


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=1,
                    help="decoder layers of the 8B-shaped model in (a)")
    ap.add_argument("--new-tokens", type=int, default=64, help="new tokens per critique in (b)")
    ap.add_argument("--only", choices=["memory", "throughput"], default=None)
    a = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if a.only != "throughput":
        memory(a.layers)
    if a.only != "memory":
        throughput(a.new_tokens)
