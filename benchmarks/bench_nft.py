"""One DiffusionNFT optimiser step vs one plain flow-matching fine-tuning step, side by side,
for the text-to-image transformer (SD3) and the editing transformer (FLUX.1-Kontext).

Both steps use the same transformer, LoRA, batch and 9 training timesteps (0.99 x 10 sampler
steps) and end in one optimiser step; the NFT step is `rl_nft.optimise_epoch` itself. It adds
the old policy's and the base model's velocities, without gradient, to a normal training step;
rl_nft computes both in one forward pass over the batch twice (`old_and_ref_velocities`).
Target: at most 1.8x the time of the plain step, with gradient checkpointing on as rl_nft.py
runs by default (the row without it is printed too).

Also prints the per-policy LoRA parameter counts of SD3.5-Medium and FLUX.1-Kontext-dev (the
sources' eight `attn.`-prefixed target names, r 32) and the parameter counts behind the
README's VRAM budgets, built on the meta device (no weights, no download).

    python benchmarks/bench_nft.py          # a few minutes on 2 CPU cores
"""
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from diffusers import FluxKontextPipeline

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import rl_nft  # noqa: E402

# SD3.5-Medium's transformer (stabilityai/stable-diffusion-3.5-medium, transformer/config.json)
SD35_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                   attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                   caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=384,
                   dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
# FLUX.1-Kontext-dev's transformer (black-forest-labs/FLUX.1-Kontext-dev, transformer/config.json)
KONTEXT_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38,
                   attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                   pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
# about 60M parameters each, the same block structures
# (dual attention and qk-norm; double + single stream)
SD3_MID = dict(sample_size=32, patch_size=2, in_channels=16, out_channels=16, num_layers=6,
               attention_head_dim=64, num_attention_heads=8, joint_attention_dim=512,
               caption_projection_dim=512, pooled_projection_dim=256, pos_embed_max_size=64,
               dual_attention_layers=(0, 1, 2), qk_norm="rms_norm")
KONTEXT_MID = dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=4,
                   attention_head_dim=64, num_attention_heads=8, joint_attention_dim=512,
                   pooled_projection_dim=256, guidance_embeds=True, axes_dims_rope=(16, 24, 24))


def build(kind, config, lora_r=32):
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
    torch.manual_seed(0)
    tr = (FluxTransformer2DModel if kind == "kontext" else SD3Transformer2DModel)(**config)
    params = rl_nft.add_policies(tr, rl_nft.Args(lora_r=lora_r, lora_alpha=2 * lora_r))
    tr.train()
    return tr, params


def kontext_ids(side):
    """(2L, 3) position ids as rl_nft.latent_geometry makes them: noisy tokens, then source."""
    ids = FluxKontextPipeline._prepare_latent_image_ids(None, side // 2, side // 2, "cpu",
                                                        torch.float32)
    source = ids.clone()
    source[:, 0] = 1
    return torch.cat([ids, source])


def inputs(kind, config, side, batch, text_len=16):
    """x0, the stacked condition and the run geometry, as rl_nft builds them, with random
    contents."""
    c = config
    cond = {"emb": torch.randn(batch, text_len, c["joint_attention_dim"]),
            "pooled": torch.randn(batch, c["pooled_projection_dim"])}
    if kind == "kontext":
        tokens = (side // 2) ** 2
        x0 = torch.randn(batch, tokens, c["in_channels"])                       # (B, L, 4C) packed
        cond["image"] = torch.randn(batch, tokens, c["in_channels"])  # the source image's tokens
        geo = rl_nft.Geometry(True, side, side, 8 * side, c["in_channels"] // 4, guidance=2.5,
                              img_ids=kontext_ids(side), txt_ids=torch.zeros(text_len, 3))
    else:
        x0 = torch.randn(batch, c["in_channels"], side, side)                    # (B, C, h, w)
        geo = rl_nft.Geometry(False, side, side, 8 * side, c["in_channels"])
    return x0, cond, geo


def plain_step(tr, opt, params, x0, cond, geo, sigmas, gen):
    """Flow matching on the same samples: mean ||v_theta - (eps - x0)||^2 at each of the 9
    timesteps."""
    n = len(sigmas) - 2  # the NFT step trains on int(0.99 x 10) = 9 of the 10 sampler timesteps
    for j in range(n):
        t = sigmas[torch.randint(n, (len(x0),), generator=gen)]
        eps = torch.randn(x0.shape, generator=gen)
        tt = t.view(-1, *([1] * (x0.ndim - 1)))
        x_t = (1 - tt) * x0 + tt * eps
        rl_nft.use_policy(tr, "default")
        v = rl_nft.velocity(tr, x_t, t, cond, geo)
        (((v - (eps - x0)) ** 2).mean() / n).backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def compare(name, kind, config, side, batch=2, repeats=3, checkpointing=True):
    tr, params = build(kind, config)
    if checkpointing:
        tr.enable_gradient_checkpointing()
    opt = torch.optim.AdamW(params, lr=1e-4)
    x0, cond, geo = inputs(kind, config, side, batch)
    r, keep = torch.rand(batch), torch.ones(batch, dtype=torch.bool)
    sigmas = torch.cat([torch.linspace(1.0, 0.1, 10), torch.zeros(1)])  # a 10-step sampler schedule
    args = rl_nft.Args(train_batch_size=batch)
    gen = torch.Generator().manual_seed(0)
    timings = {"plain": [], "nft": []}
    for i in range(repeats + 1):  # the first round warms up and is not counted
        for step in ("plain", "nft"):
            t0 = time.perf_counter()
            if step == "plain":
                plain_step(tr, opt, params, x0, cond, geo, sigmas, gen)
            else:
                run = SimpleNamespace(pipe=SimpleNamespace(transformer=tr), optimizer=opt,
                                      params=params, sigmas=sigmas, geo=geo, args=args, ema=None)
                rl_nft.optimise_epoch(run, rl_nft.Collected(x0, cond, r, keep), gen, 0)
            if i:
                timings[step].append(time.perf_counter() - t0)
    n_params = sum(p.numel() for n, p in tr.named_parameters() if "lora_" not in n)
    plain, nft = statistics.median(timings["plain"]), statistics.median(timings["nft"])
    ckpt = "on" if checkpointing else "off"
    print(
        f"{name:<44} {ckpt:>5} {n_params / 1e6:>7.1f}M  {plain:>8.3f} s  {nft:>8.3f} s  "
        f"{nft / plain:>6.2f}x"
    )


def first_epoch(lines: int, folder: Path) -> float:
    """Seconds from start to the end of epoch 1 of a tiny-random run whose prompt file has `lines`
    prompts: rl_nft encodes only the prompts an epoch draws, so the file's length barely counts."""
    folder.mkdir(parents=True, exist_ok=True)
    prompts = folder / f"prompts-{lines}.txt"
    prompts.write_text("".join(f"a photo of object number {i}\n" for i in range(lines)))
    t0 = time.perf_counter()
    rl_nft.main(["--generator", "tiny-random", "--scorer", "tiny-random", "--epochs", "1",
                 "--prompts", str(prompts), "--out", str(folder / f"run-{lines}")])
    return time.perf_counter() - t0


def budget():
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
    gb = 1e9
    print()
    for name, cls, config in (("SD3.5-Medium", SD3Transformer2DModel, SD35_MEDIUM),
                              ("FLUX.1-Kontext-dev", FluxTransformer2DModel, KONTEXT_DEV)):
        with torch.device("meta"):
            tr = cls(**config)
            base = sum(p.numel() for p in tr.parameters())
            lora_params = rl_nft.add_policies(tr, rl_nft.Args())
            lora = sum(p.numel() for p in lora_params)
        modules = {n.rsplit(".lora_", 1)[0] for n, _ in tr.named_parameters()
                   if ".lora_A.default" in n}
        print(f"{name}: transformer {base / 1e9:.2f}B parameters -> {2 * base / gb:.1f} GB bf16, "
              f"{0.5 * base / gb * 1.07:.1f} GB nf4 (0.5 byte + ~7% scales and unquantized layers)")
        print(f"  LoRA r32 on {len(modules)} modules: {lora / 1e6:.1f}M parameters per policy; "
              f"theta + old + EMA + grad + AdamW 2 x fp32 = {lora * 4 * 6 / gb:.2f} GB")


if __name__ == "__main__":
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print(
        f"{'transformer':<44} {'ckpt':>5} {'params':>8}  {'plain FM':>10}  {'NFT':>10}  "
        f"{'ratio':>7}  (target <= 1.8x)"
    )
    compare("SD3, SD3.5-M's block structure (32x32 latent)", "sd3", SD3_MID, 32)
    compare("FLUX, Kontext's block structure (16x16 tokens)", "kontext", KONTEXT_MID, 32)
    compare("SD3, SD3.5-M's block structure (32x32 latent)", "sd3", SD3_MID, 32,
            checkpointing=False)
    with tempfile.TemporaryDirectory() as tmp:
        first_epoch(20, Path(tmp))  # warm-up: the tiny models are built and cached once
        short, long = first_epoch(20, Path(tmp) / "a"), first_epoch(5000, Path(tmp) / "b")
    print(f"\ntime to the end of epoch 1 (tiny-random): 20 prompts {short:.1f} s, 5,000 prompts "
          f"{long:.1f} s: {long / short:.2f}x (target near 1)")
    compare("FLUX, Kontext's block structure (16x16 tokens)", "kontext", KONTEXT_MID, 32,
            checkpointing=False)
    budget()
