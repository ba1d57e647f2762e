"""One DiffusionNFT update vs one plain flow-matching fine-tuning step, side by side.

Both steps use the same transformer, LoRA, batch and timesteps; each loops over the same
training timesteps and ends in one optimiser step. An NFT step adds two forward passes
without gradient (the old policy and the base model) to a normal training step, so the
target is at most 2.0x the time of the plain step.

Also prints the parameter counts behind the README's VRAM budget for the default run
(SD3.5-Medium transformer + LoRA r32 on the attention and context projections), built on
the meta device (no weights, no download).

    python benchmarks/bench_nft.py          # about two minutes on 2 CPU cores
"""
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import rl_nft  # noqa: E402

# SD3.5-Medium's transformer (stabilityai/stable-diffusion-3.5-medium, transformer/config.json)
SD35_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
                   num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                   pooled_projection_dim=2048, pos_embed_max_size=384, dual_attention_layers=tuple(range(13)),
                   qk_norm="rms_norm")
# about 60M parameters, the same block structure (dual attention, qk-norm)
MID = dict(sample_size=32, patch_size=2, in_channels=16, out_channels=16, num_layers=6, attention_head_dim=64,
           num_attention_heads=8, joint_attention_dim=512, caption_projection_dim=512, pooled_projection_dim=256,
           pos_embed_max_size=64, dual_attention_layers=(0, 1, 2), qk_norm="rms_norm")
TINY = dict(sample_size=32, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
            num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=64,
            pos_embed_max_size=64)


def build(config, lora_r=32):
    from diffusers import SD3Transformer2DModel
    torch.manual_seed(0)
    tr = SD3Transformer2DModel(**config)
    params = rl_nft.add_policies(tr, rl_nft.Args(lora_r=lora_r, lora_alpha=2 * lora_r))
    tr.train()
    return tr, params


def plain_step(tr, opt, params, x0, emb, pooled, train_sigmas, gen):
    """Flow matching on the same samples: mean ||v_theta - (eps - x0)||^2 at each timestep."""
    n = len(train_sigmas)
    for j in range(n):
        t = train_sigmas[torch.randint(n, (len(x0),), generator=gen)]
        eps = torch.randn(x0.shape, generator=gen)
        x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps
        rl_nft.use_policy(tr, "default")
        v = rl_nft.velocity(tr, x_t, t, emb, pooled)
        (((v - (eps - x0)) ** 2).mean() / n).backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def compare(name, config, side, batch=2, text_len=16, repeats=3):
    tr, params = build(config)
    opt = torch.optim.AdamW(params, lr=1e-4)
    c = config
    x0 = torch.randn(batch, c["in_channels"], side, side)
    emb, pooled = torch.randn(batch, text_len, c["joint_attention_dim"]), torch.randn(batch, c["pooled_projection_dim"])
    r = torch.rand(batch)
    sigmas = torch.linspace(1.0, 0.1, 9)  # 9 training timesteps, as 0.99 x 10 sampler steps
    args = rl_nft.Args()
    gen = torch.Generator().manual_seed(0)
    timings = {"plain": [], "nft": []}
    for i in range(repeats + 1):  # the first round warms up and is not counted
        for kind in ("plain", "nft"):
            t0 = time.perf_counter()
            if kind == "plain":
                plain_step(tr, opt, params, x0, emb, pooled, sigmas, gen)
            else:
                rl_nft.nft_update(tr, opt, params, x0, emb, pooled, r, sigmas, args, gen)
            if i:
                timings[kind].append(time.perf_counter() - t0)
    n_params = sum(p.numel() for n, p in tr.named_parameters() if "lora_" not in n)
    plain, nft = statistics.median(timings["plain"]), statistics.median(timings["nft"])
    print(f"{name:<34} {n_params / 1e6:>8.1f}M  {plain:>8.3f} s  {nft:>8.3f} s  {nft / plain:>6.2f}x  (target <= 2.0x)")


def budget():
    from diffusers import SD3Transformer2DModel
    with torch.device("meta"):
        tr = SD3Transformer2DModel(**SD35_MEDIUM)
        base = sum(p.numel() for p in tr.parameters())
        lora = sum(p.numel() for p in rl_nft.add_policies(tr, rl_nft.Args()))
    gb = 1e9
    print(f"\nSD3.5-Medium transformer: {base / 1e9:.2f}B parameters -> {2 * base / gb:.1f} GB in bf16")
    print(f"LoRA r32 on {len(rl_nft.TARGET_MODULES)} projection kinds: {lora / 1e6:.1f}M parameters per policy;")
    print(f"  theta fp32 + old fp32 + grad fp32 + AdamW 2 x fp32 = {lora * 4 * 5 / gb:.2f} GB")


if __name__ == "__main__":
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print(f"{'model':<34} {'params':>9}  {'plain FM':>10}  {'NFT':>10}  {'ratio':>7}")
    compare("tiny SD3 (64 px, 32x32 latent)", TINY, 32)
    compare("random SD3 ~60M (256 px, 32x32 latent)", MID, 32)
    budget()
