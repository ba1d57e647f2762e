"""DiffusionNFT with LoRA on a flow-matching generator, rewarded by the critique scorer.

Implements the training-time half of Sec. 2.2 of "RationalRewards: Reasoning Rewards Scale
Visual Generation Both Training and Test Time" (arXiv 2604.11626): the scorer's per-dimension
critique scores, aggregated into R in [0, 1], are the reward of DiffusionNFT (Zheng et al.,
"DiffusionNFT: Online Diffusion Reinforcement with Forward Process"). Two tasks, one algorithm:

  --task t2i   SD3.5-Medium, as DiffusionNFT's own code runs it (NVlabs/DiffusionNFT);
  --task edit  FLUX.1-Kontext-dev, rewarded by the editing scorer, as the official RationalRewards
               RL runs it (TIGER-AI-Lab/RationalRewards). Their files: docs/REFERENCE.md.

Each epoch:
  1. collect   the frozen old policy samples K images per prompt with a deterministic
               second-order multistep ODE solver ("dpm2"); only the final clean latents x0 are kept;
  2. reward    images are decoded and critiqued; R = (mean readable score - 1) / 3;
  3. optimise  the NFT loss on (x0, r) at the sampler's own timesteps, gradients accumulated
               over the whole epoch, --gradient-steps-per-epoch optimiser steps (1);
  4. update    old <- eta old + (1 - eta) theta; an EMA of theta is what eval and lora/ use.

Notation (shapes in comments): B samples; a latent is (C, h, w) for SD3 and (L, F) for FLUX
(L packed 2x2 tokens of F = 4C features), written (B, ...) below.
    x0  clean latent of a collected sample      eps ~ N(0, I)      t = sigma in (0, 1]
    x_t = (1 - t) x0 + t eps                    v = eps - x0 (the flow-matching velocity)
    v_theta / v_old / v_ref                      velocities of the trained, old and base policies
    R   reward in [0, 1]      A  group-normalised advantage       r  optimality in [0, 1]

Where is (the method block runs in the epoch's order; ``train_epoch``, its last function, is the
one to read first):
    the two policies    ``add_policies``, ``use_policy``; SD3 vs FLUX: ``Geometry``, ``velocity``
    1. collect          ``sample_latents`` (``solve_flow_ode``: the dpm2 solver)
    2. reward           ``reward_images``; R -> A -> r ``optimality_from_rewards``; ``train_mask``
    3. optimise         ``nft_loss`` (the objective), ``minibatch_loss``, ``optimise_epoch``
    4. update           ``soft_update``; the EMA ``ema_update``
    the harness         ``Args``, ``Run``, several processes, checkpoints, ``main``

Commands (a CPU smoke run, a real run on one GPU) and their outputs: README.md, "DiffusionNFT".

Deviations from the sources:
1. Scale: 512 px, K=4 images per prompt and 4 prompts per epoch by default (DiffusionNFT:
   K=24, 48 prompts; official Kontext: K=8, 64 prompts; both on 8 GPUs); see the README table.
2. Groups are keyed by prompt and source image (the official edit code keys them by the
   instruction alone: two source images with one instruction share a group).
3. The sampler passes t * 1000 to SD3 as a float (DiffusionNFT's sampler passes an integer; its
   training step, like ours, float32).
4. Mini-batches hold --train-batch-size samples; the last one may be smaller (the sources choose
   batch sizes that divide the epoch exactly).
5. Precision: the transformer's weights are bf16 on a GPU (the sources keep fp32 weights under
   autocast: DiffusionNFT fp16 with a GradScaler, Kontext bf16); fp32 would not fit 24 GB. The
   VAE runs in float32 and LoRA weights train in float32, as in both sources.
6. A critique the scorer's server could not give (after its retries) stops the run; the official
   edit RL scores it 0 and trains on. `--resume` continues from the last finished epoch.
"""
from __future__ import annotations

import contextlib
import csv
import gc
import hashlib
import io
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import common  # first: Ctrl-C while the libraries below import is one line, exit 130
import numpy as np
from PIL import Image, ImageOps

import rationalrewards as rr

# torch loads on first use: `--help` and flag errors answer at once, not after ~3 s (2 CPU cores)
torch = common.LazyModule("torch")


# ---- The two policies: LoRA adapters theta (trained) and old (samples) on one transformer ----
# The sources' LoRA targets; `attn.` keeps peft's suffix match off `attn2` (docs/REFERENCE.md)
TARGET_MODULES = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                  "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"]

def add_policies(transformer, args: Args) -> list:
    """Adds adapters "default" (theta, trained) and "old" (samples; = theta at the start); returns
    theta's trainable parameters. The base model, adapters disabled, is the KL reference."""
    from peft import LoraConfig
    transformer.requires_grad_(False)
    for name in ("default", "old"):  # (peft's warning about a second adapter is muted in common)
        transformer.add_adapter(
            LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, init_lora_weights="gaussian",
                       target_modules=TARGET_MODULES), adapter_name=name)
    theta, old = adapter_params(transformer, "default"), adapter_params(transformer, "old")
    with torch.no_grad():
        for k, p in theta.items():
            # LoRA weights train in fp32 even on a bf16 or 4-bit base (QLoRA)
            p.data = p.data.float()
            old[k].data = p.data.clone()
    use_policy(transformer, "default")
    return list(theta.values())

def adapter_params(transformer, adapter: str) -> dict:
    """{module path: parameter} of one adapter's LoRA weights, keyed without the adapter name."""
    tag = f".{adapter}."
    return {n.replace(tag, "."): p for n, p in transformer.named_parameters()
            if "lora_" in n and tag in n}

def use_policy(transformer, policy: Optional[str]) -> None:
    """Route forward passes through the adapter "default" or "old", or the base model (None)."""
    if policy is None:
        transformer.disable_adapters()
        return
    transformer.enable_adapters()
    transformer.set_adapter(policy)
    # peft's set_adapter makes the active adapter trainable; only theta ever is
    for n, p in transformer.named_parameters():
        if "lora_" in n:
            p.requires_grad_(".default." in n)


# ---- Where SD3 and FLUX.1-Kontext differ: the latent layout and the velocity ----
@dataclass
class Geometry:
    """What every velocity call of a run shares (made by `latent_geometry`)."""
    kontext: bool                 # FLUX.1-Kontext (editing), else SD3
    h: int                        # latent height and width (pixels / the VAE's factor)
    w: int
    resolution: int               # image side in pixels
    channels: int                 # latent channels C, unpacked
    guidance: float = 1.0         # FLUX's distilled guidance strength
    img_ids: object = None        # FLUX: (2L, 3) ids of the noisy tokens, then the source's
    txt_ids: object = None        # FLUX: (128, 3) ids of the text tokens (all zero)


# FLUX.1-Kontext packs a latent (B, C, h, w) into (B, h/2 * w/2, 4C) tokens of 2x2 patches, with
# position ids (first, row, column) each: first = 0 for the noisy tokens, 1 for the source's.
def pack(latents):
    from diffusers import FluxKontextPipeline
    return FluxKontextPipeline._pack_latents(latents, *latents.shape)  # (B, L, 4C)

def latent_geometry(pipe, resolution: int, guidance_scale: float) -> Geometry:
    kontext = type(pipe).__name__.startswith("FluxKontext")
    # Kontext packs 2x2 latents: its sides are multiples of 2 * vae_scale_factor
    multiple = pipe.vae_scale_factor * (2 if kontext else pipe.transformer.config.patch_size)
    if resolution % multiple:
        raise ValueError(
            f"--resolution must be a multiple of {multiple} for this generator, got {resolution}")
    side = resolution // pipe.vae_scale_factor
    geo = Geometry(kontext, side, side, resolution, guidance=guidance_scale,
                   channels=pipe.transformer.config.in_channels // (4 if kontext else 1))
    if kontext:  # (2L, 3): the noisy tokens' ids, then the source's (first = 1)
        ids = pipe._prepare_latent_image_ids(None, side // 2, side // 2, "cpu", torch.float32)
        source = ids.clone()
        source[:, 0] = 1
        geo.img_ids = torch.cat([ids, source])
        geo.txt_ids = torch.zeros(TEXT_TOKENS, 3)  # as FluxKontextPipeline.encode_prompt's
    return geo

def velocity(transformer, x, t, cond: dict, geo: Geometry):
    """v(x_t, t | condition) from the transformer, either model. x: (B, ...); t: (B,) in (0, 1]."""
    if geo.kontext:
        # the source's tokens follow the noisy ones and only the noisy outputs are kept; t and the
        # guidance go in unscaled (the transformer multiplies both by 1000 itself)
        hidden = torch.cat([x, cond["image"]], dim=1)  # (B, 2L, 4C)
        guidance = torch.full((len(x),), geo.guidance, device=x.device, dtype=torch.float32)
        out = transformer(hidden_states=hidden, timestep=t, guidance=guidance,
                          pooled_projections=cond["pooled"], encoder_hidden_states=cond["emb"],
                          txt_ids=geo.txt_ids.to(x.device), img_ids=geo.img_ids.to(x.device),
                          return_dict=False)[0]
        return out[:, :x.shape[1]]  # (B, L, 4C)
    # SD3 takes t * 1000 in float32 whatever its dtype (Deviation 3); it casts after the sinusoid
    return transformer(hidden_states=x, timestep=t.float() * 1000,
                       encoder_hidden_states=cond["emb"], pooled_projections=cond["pooled"],
                       return_dict=False)[0]  # (B, C, h, w)


# ---- The epoch's prompts and their conditions ----
def draw_prompts(items: list, banned: list, n: int, rng: random.Random) -> list:
    """The epoch's n prompts, none banned: without replacement while enough are left; [] if none."""
    banned = set(banned)
    if not (allowed := [it for it in items if it["key"] not in banned]):
        return []
    chosen = rng.sample(allowed, min(n, len(allowed)))
    return chosen + [rng.choice(allowed) for _ in range(n - len(chosen))]

def encode_conditions(pipe, items: list, geo: Geometry) -> dict:
    """item key -> its condition, for one epoch's items (or the eval grid), encoded when needed:
    SD3 {emb (1, Lt, D), pooled (1, P)}; Kontext adds the source's packed latent (1, L, 4C)."""
    conds, device = {}, pipe.transformer.device
    with torch.no_grad(), text_encoders_on(pipe, device):
        for it in items:
            if it["key"] in conds:
                continue
            p = it["prompt"]
            if geo.kontext:
                emb, pooled, _ = pipe.encode_prompt(prompt=p, prompt_2=p, device=device,
                                                    max_sequence_length=TEXT_TOKENS)
                conds[it["key"]] = {"emb": emb.cpu(), "pooled": pooled.cpu(),
                                    "image": encode_source(pipe, it["source"], geo).cpu()}
            else:
                emb, _, pooled, _ = pipe.encode_prompt(
                    prompt=p, prompt_2=p, prompt_3=p, do_classifier_free_guidance=False,
                    device=device, max_sequence_length=TEXT_TOKENS)
                conds[it["key"]] = {"emb": emb.cpu(), "pooled": pooled.cpu()}
    return conds

@contextlib.contextmanager
def text_encoders_on(pipe, device):
    """The text encoders on `device` while prompts encode, then on the CPU (on a GPU; not 4-bit)."""
    encoders = [e for e in (getattr(pipe, f"text_encoder{n}", None) for n in ("", "_2", "_3"))
                if e is not None and getattr(e, "hf_quantizer", None) is None]
    for e in encoders:
        e.to(device)
    try:
        yield
    finally:
        if torch.device(device).type == "cuda":
            for e in encoders:
                e.to("cpu")
            torch.cuda.empty_cache()

def encode_source(pipe, image: Image.Image, geo: Geometry):
    """The source image as Kontext sees it: the VAE latent's mode, normalised, packed (1, L, 4C)."""
    pixels = pipe.image_processor.preprocess(image, height=geo.resolution, width=geo.resolution)
    z = pipe._encode_vae_image(pixels.to(pipe.vae.device, pipe.vae.dtype), generator=None)
    return pack(z.float())

def collate(conds: dict, keys: list, device, dtype) -> dict:
    """The conditions of a batch of samples, stacked: {name: (B, ...)}."""
    return {name: torch.cat([conds[k][name] for k in keys]).to(device, dtype)
            for name in conds[keys[0]]}


# ---- Step 1: collect, a deterministic ODE from seeded noise with the old policy ----
def initial_noise(seeds: list, geo: Geometry):
    """One seeded N(0, I) latent per sample: (B, C, h, w), or packed (B, L, 4C) for FLUX."""
    shape = (geo.channels, geo.h, geo.w)
    noise = torch.stack([torch.randn(*shape, generator=torch.Generator().manual_seed(s))
                         for s in seeds])  # (B, C, h, w)
    return pack(noise) if geo.kontext else noise

def sampler_sigmas(pipe, steps: int, geo: Optional[Geometry] = None):
    """The scheduler's own noise levels for `steps` steps, plus the final 0: SD3's static shift, or
    FLUX's resolution-dependent shift mu (sigmas linspace(1, 1/S, S), as the Kontext pipeline)."""
    sch = pipe.scheduler
    if sch.config.get("use_dynamic_shifting"):
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift
        seq_len = (geo.h // 2) * (geo.w // 2)
        mu = calculate_shift(seq_len, sch.config.get("base_image_seq_len", 256),
                             sch.config.get("max_image_seq_len", 4096),
                             sch.config.get("base_shift", 0.5), sch.config.get("max_shift", 1.15))
        sch.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu, device="cpu")
    else:
        sch.set_timesteps(steps, device="cpu")
    return sch.sigmas.float().clone()

def solve_flow_ode(velocity_fn, x, sigmas, solver: str = "dpm2"):
    """Integrate dx/dt = v(x, t) from t = sigmas[0] down to sigmas[-1]; returns x at the end.

    euler: x_{i+1} = x_i + (t_{i+1} - t_i) v_i       (first order; deterministic DDIM is the same)
    dpm2:  the multistep DPM-Solver++(2M) in data-prediction form, with alpha_t = 1 - t,
           sigma_t = t, lambda_t = log(alpha_t / sigma_t), D_i = x_i - t_i v_i (the predicted
           clean sample):
               h = lambda_{i+1} - lambda_i,   r0 = (lambda_i - lambda_{i-1}) / h
               x_{i+1} = (t_{i+1} / t_i) x_i - alpha_{i+1} (e^{-h} - 1) D2_i
               D2_i = D_i + (D_i - D_{i-1}) / (2 r0)
           The first step (no history; also the second when it starts at t = 1, lambda = -inf)
           and the last, to t = 0 (lambda = +inf), are first-order, as DiffusionNFT's dpm_step.
    x: (B, ...); sigmas: (S + 1,) decreasing.
    """
    sig = sigmas.double()
    lam = lambda i: math.log((1 - float(sig[i])) / float(sig[i]))
    prev_d = None
    for i in range(len(sig) - 1):
        t, t_next = sig[i], sig[i + 1]
        v = velocity_fn(x, i).double()                                            # (B, ...)
        d = x.double() - t * v                                                    # D_i
        first_order = solver == "euler" or prev_d is None or t_next <= 0 or sig[i - 1] >= 1
        if first_order:
            x_next = x.double() + (t_next - t) * v
        else:
            h = lam(i + 1) - lam(i)
            r0 = (lam(i) - lam(i - 1)) / h
            d2 = d + (d - prev_d) / (2 * r0)                                          # D2_i
            x_next = (t_next / t) * x.double() - (1 - t_next) * math.expm1(-h) * d2
        prev_d, x = d, x_next.to(x.dtype)
    return x

def sample_latents(pipe, cond: dict, seeds: list, sigmas, geo: Geometry, policy: str, solver: str):
    """Deterministic ODE from seeded noise to x0 (B, ...), one policy, CFG-free as DiffusionNFT."""
    tr = pipe.transformer
    device, dtype = tr.device, tr.dtype
    cond = {k: v.to(device, dtype) for k, v in cond.items()}
    use_policy(tr, policy)

    def v_fn(x, i):
        t = sigmas[i].expand(len(x)).to(device, torch.float32)  # float32 t, as in training
        return velocity(tr, x.to(dtype), t, cond, geo).float()

    with torch.no_grad():
        x = initial_noise(seeds, geo).to(device).float()
        x = solve_flow_ode(v_fn, x, sigmas.to(device), solver)
    use_policy(tr, "default")
    return x.float()

def decode(pipe, x0, geo: Geometry) -> list:
    """Clean latents -> PIL images."""
    vae = pipe.vae
    if geo.kontext:  # (B, L, 4C) -> (B, C, h, w)
        x0 = pipe._unpack_latents(x0, geo.resolution, geo.resolution, pipe.vae_scale_factor)
    with torch.no_grad():
        z = x0.to(vae.device, vae.dtype) / vae.config.scaling_factor
        z = z + (vae.config.shift_factor or 0.0)
        images = vae.decode(z, return_dict=False)[0]
    return pipe.image_processor.postprocess(images.float(), output_type="pil")


# ---- Step 2: reward R from critiques, then optimality r and the mask ----
def reward_images(scorer, images: list, items: list) -> dict:
    """Critique every image against its item, batched: R per image, scores, unreadable count."""
    from tqdm import tqdm
    critiques = []
    step = max(1, getattr(scorer.backend, "batch_size", 8))  # HTTP backends have none: 8
    for i in tqdm(range(0, len(images), step), desc="reward: critiques", unit="batch", leave=False,
                  disable=common.RANK > 0):
        batch = items[i:i + step]
        critiques += scorer.critique(images[i:i + step], [it["prompt"] for it in batch],
                                     [it.get("source") for it in batch])
    truncated = sum(c.truncated for c in critiques)
    rr.warn_truncated(truncated, len(critiques), "--scorer-max-new-tokens",
                      getattr(scorer.backend, "name", None))
    return {"rewards": [rr.reward_from_scores(c.scores, scorer.weights) for c in critiques],
            "scores": [c.scores for c in critiques],
            "not_applicable": [c.not_applicable for c in critiques],
            "unreadable": sum(not c.readable for c in critiques),
            "truncated": truncated}

def _with_group_means(rewards, group_ids) -> tuple:
    """(R, the mean reward of each sample's group), both (N,) float64."""
    R, g = torch.as_tensor(rewards, dtype=torch.float64), torch.as_tensor(group_ids)
    means = torch.zeros_like(R)
    for gid in g.unique():
        means[g == gid] = R[g == gid].mean()
    return R, means

def optimality_from_rewards(rewards, group_ids, adv_clip: float = 5.0):
    """r in [0, 1] per sample from its reward and its prompt group (sources: global_std = True).

    A = (R - mean_of_prompt_group) / (std_global + 1e-4),  A <- clip(A, -c, c),  r = 0.5 + 0.5 A / c
    """
    R, group_mean = _with_group_means(rewards, group_ids)        # (N,), (N,)
    A = (R - group_mean) / (R.std(unbiased=False) + 1e-4)      # global std (population)
    A = A.clamp(-adv_clip, adv_clip)
    return (0.5 + 0.5 * A / adv_clip).float()                  # (N,)

def train_mask(rewards, group_ids, rule: str = "none", min_std: float = 0.05,
               max_mean: float = 0.9):
    """Which samples the loss is computed on: (N,) bool. none (DiffusionNFT): every sample.
    official (RationalRewards, ban_prompt on): kept when the epoch's GLOBAL reward std (+ 1e-4, as
    the stat tracker returns it) exceeds min_std and its prompt group's mean is below max_mean."""
    R, group_mean = _with_group_means(rewards, group_ids)
    if rule == "none":
        return torch.ones(len(R), dtype=torch.bool)
    return (R.std(unbiased=False) + 1e-4 > min_std) & (group_mean < max_mean)

def groups_to_ban(rewards, group_ids, min_std: float = 0.05, max_mean: float = 0.9) -> list:
    """Groups whose OWN rewards barely vary and are already high: the official rule bans them."""
    R, g = torch.as_tensor(rewards, dtype=torch.float64), torch.as_tensor(group_ids)
    return [gid for gid in g.unique().tolist()
            if R[g == gid].std(unbiased=False) < min_std and R[g == gid].mean() > max_mean]


# ---- Step 3: optimise the NFT loss over the epoch ----
def training_timesteps(num_samples: int, num_steps: int, gen, fraction: float = 0.99):
    """(N, int(fraction * S)) indices into the sampler's S timesteps, per sample the first of its
    own permutation: each drops a random timestep (DiffusionNFT's perms_time; sources: 0.99)."""
    k = max(1, int(num_steps * fraction))
    return torch.stack([torch.randperm(num_steps, generator=gen)[:k] for _ in range(num_samples)])

def accumulation_groups(num_batches: int, num_steps: int) -> list:
    """`num_steps` contiguous groups of the mini-batch indices 0..n-1, one optimiser step each."""
    bounds = [round(i * num_batches / num_steps) for i in range(num_steps + 1)]
    return [list(range(bounds[i], bounds[i + 1])) for i in range(num_steps)]

@contextlib.contextmanager
def old_on_first(transformer, n: int):
    """While active (the "old" adapter set), the old LoRA acts on a batch's first n samples only and
    the rest see the base model: one pass over [x; x] gives v_old and v_ref (two passes fused)."""
    def mask_delta(module, inputs, output):
        output[n:] = 0  # the LoRA delta zeroed past sample n
    hooks = [m.register_forward_hook(mask_delta) for name, m in transformer.named_modules()
             if name.endswith(".lora_B.old")]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()

def old_and_ref_velocities(transformer, x, t, cond: dict, geo: Geometry) -> tuple:
    """(v_old, v_ref) without gradient, from one forward pass over the batch twice."""
    use_policy(transformer, "old")
    with torch.no_grad(), old_on_first(transformer, len(x)):
        both = velocity(transformer, torch.cat([x, x]), torch.cat([t, t]),
                        {k: torch.cat([v, v]) for k, v in cond.items()}, geo)      # (2B, ...)
    return both[:len(x)], both[len(x):]

def nft_loss(v_theta, v_old, v_ref, x_t, x0, t, r, beta: float = 1.0, kl_weight: float = 1e-4,
             policy_scale: float = 5.0):
    """The DiffusionNFT objective at one timestep per sample. Returns (loss, {policy, kl}).

        v+ = beta v_theta + (1 - beta) v_old          implicit positive policy
        v- = (1 + beta) v_old - beta v_theta          implicit negative policy (mirror of v+)
        x0_hat(v) = x_t - t v
        L(v) = mean (x0_hat(v) - x0)^2 / sg(max(mean |x0_hat(v) - x0|, 1e-5))
        loss = policy_scale * mean_B[ r L(v+) + (1 - r) L(v-) ] / beta
               + kl_weight * mean_B ||v_theta - v_ref||^2

    - r in [0, 1] is the sample's optimality: r = 1 pulls v+ onto the sample, r = 0 pulls v- onto
      it (which pushes v_theta away from it); r = 0.5 pulls both equally and the gradients cancel.
    - policy_scale: the sources multiply the policy term by the advantage clip (5), so that
      kl_weight 1e-4 weighs the KL as in their configs.
    - "KL" here is a velocity MSE to the base model (adapters off), the Gaussian KL between the
      two policies' one-step transitions up to a constant factor; v_ref carries no gradient.
    - Why x0 space: x_t - t v_hat - x0 = t (v - v_hat), so the error of a predicted clean sample
      is the velocity error weighted by t; the adaptive weight (per sample, no gradient) divides
      by its own mean magnitude, which evens the scale across timesteps.

    v_theta, v_old, v_ref, x_t, x0: (B, ...); t, r: (B,).
    """
    dims = tuple(range(1, x0.ndim))                             # every axis but the batch
    t = t.view(-1, *([1] * (x0.ndim - 1)))                      # (B, 1, ...)
    # implicit positive and negative policies around the old one
    v_pos = beta * v_theta + (1 - beta) * v_old                 # (B, ...)
    v_neg = (1 + beta) * v_old - beta * v_theta
    # x0 predictions from x_t = (1 - t) x0 + t eps and v = eps - x0:  x0_hat = x_t - t v
    x0_pos, x0_neg = x_t - t * v_pos, x_t - t * v_neg

    def adaptive_mse(x0_hat):
        # L = mean((x0_hat - x0)^2) / sg(max(mean|x0_hat - x0|, 1e-5)), per sample
        err = x0_hat - x0
        weight = err.detach().double().abs().mean(dim=dims).clamp(min=1e-5).to(err.dtype)
        return (err ** 2).mean(dim=dims) / weight                                            # (B,)

    # policy term: r pulls v+ toward x0, (1 - r) pulls v- toward x0
    policy = (r * adaptive_mse(x0_pos) + (1 - r) * adaptive_mse(x0_neg)).mean() / beta
    # KL to the base model (adapters off): mean ||v_theta - v_ref||^2
    kl = ((v_theta - v_ref) ** 2).mean(dim=dims).mean()
    stats = {"policy": float(policy.detach()), "kl": float(kl.detach())}
    return policy_scale * policy + kl_weight * kl, stats

@dataclass
class Collected:
    """An epoch's samples, as step 3 trains on them (N samples, in the epoch's order)."""
    x0: object     # (N, ...) clean latents from the old policy
    cond: dict     # {name: (N, ...)} their conditions
    r: object      # (N,) optimality in [0, 1]
    keep: object   # (N,) bool: the mask (False: left out of the loss)

def minibatch_loss(run: Run, c: Collected, idx, eps, t_idx, denom: int, log: list):
    """The NFT loss of samples `idx` at each of their training timesteps, its gradient / `denom`
    added to theta's; what went non-finite, or None. eps: (b, k, ...); t_idx: (b, k) into sigmas."""
    tr, geo, args = run.pipe.transformer, run.geo, run.args
    device, dtype = tr.device, tr.dtype
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    x0, r = c.x0[idx].to(device), c.r[idx].to(device)                           # (b, ...), (b,)
    cond = {k: v[idx].to(device, dtype) for k, v in c.cond.items()}
    for j in range(t_idx.shape[1]):
        t = run.sigmas[t_idx[:, j]].to(device)                                  # (b,)
        # forward process: x_t = (1 - t) x0 + t eps
        tt = t.view(-1, *([1] * (x0.ndim - 1)))
        x_t = (1 - tt) * x0 + tt * eps[:, j].to(device)                         # (b, ...)
        # t stays float32, as in the sources: in bf16 SD3's t x 1000 lands on multiples of 4
        xt_in, t_in = x_t.to(dtype), t.float()
        with autocast:
            v_old, v_ref = old_and_ref_velocities(tr, xt_in, t_in, cond, geo)
            use_policy(tr, "default")
            v_theta = velocity(tr, xt_in, t_in, cond, geo).float()
        loss, stats = nft_loss(v_theta, v_old.float(), v_ref.float(), x_t, x0, t, r, args.beta,
                               args.kl_weight, policy_scale=args.adv_clip)
        if not torch.isfinite(loss):
            return f"loss became {float(loss.detach())}"
        (loss / denom).backward()
        log.append((float(loss.detach()), stats["policy"], stats["kl"]))
    return None

def ema_decay(step: int, max_decay: float = 0.9) -> float:
    """min((1 + step) / (10 + step), max_decay) after optimiser step `step`: near theta early on."""
    return min((1 + step) / (10 + step), max_decay)

def ema_update(ema: dict, transformer, step: int, max_decay: float = 0.9) -> None:
    """ema <- d ema + (1 - d) theta with d = ema_decay(step)."""
    d = ema_decay(step, max_decay)
    with torch.no_grad():
        for k, p in adapter_params(transformer, "default").items():
            ema[k].mul_(d).add_(p.detach().to(ema[k].device, ema[k].dtype), alpha=1 - d)

def optimise_epoch(run: Run, c: Collected, gen, step: int) -> tuple:
    """Step 3: the NFT loss over every mini-batch and training timestep of the epoch; each group of
    mini-batches accumulates its gradient into one clipped optimiser step. Masked samples stay in
    their mini-batches, only the kept are computed (the loss is a mean over the kept, 0 if none).
    Returns (new global step, the epoch's mean loss terms or None)."""
    N, S, B = len(c.x0), len(run.sigmas) - 1, run.args.train_batch_size
    order = torch.randperm(N, generator=gen)                                  # shuffled samples
    t_idx = training_timesteps(N, S, gen)                                     # (N, k)
    batches = [order[i:i + B] for i in range(0, N, B)]
    log = []  # (loss, policy, kl) of each mini-batch and timestep computed on this rank
    for group in accumulation_groups(len(batches), run.args.gradient_steps_per_epoch):
        denom, problem = len(group) * t_idx.shape[1], None
        for i in group:
            b = batches[i]
            # noise for every sample and timestep (B, k, ...), drawn before masking and by every
            # rank, so that neither the mask nor the rank changes what later samples draw
            eps = torch.randn((len(b), t_idx.shape[1], *c.x0.shape[1:]), generator=gen)
            kept = c.keep[b]
            if common.mine(i) and kept.any() and problem is None:
                problem = minibatch_loss(run, c, b[kept], eps[kept], t_idx[b[kept]], denom, log)
        step = optimiser_step(run, problem, step)
    return step, loss_means(log)


# ---- Step 4: the old policy trails theta ----
def old_policy_decay(step: int, rate: float = 0.001, max_eta: float = 0.5) -> float:
    """eta = min(rate * step, max_eta), step counting optimiser steps: old trails theta more."""
    return min(rate * step, max_eta)

def soft_update(transformer, eta: float) -> None:
    """old <- eta old + (1 - eta) theta, on every LoRA weight."""
    theta, old = adapter_params(transformer, "default"), adapter_params(transformer, "old")
    with torch.no_grad():
        for k, p in old.items():
            p.mul_(eta).add_(theta[k].detach().to(p.dtype), alpha=1 - eta)


# ---- One epoch: the four steps, in order. Read this first. ----
def train_epoch(run: Run, state: dict, epoch: int) -> Optional[dict]:
    """One epoch of DiffusionNFT, the four steps of the module docstring. Updates `state` (step,
    banned prompts); returns the epoch's statistics, or None when every prompt is banned."""
    args, K = run.args, run.args.group_size
    rng, gen = random.Random(f"{args.seed}:{epoch}"), epoch_generator(args.seed, epoch)
    torch.manual_seed(epoch_seed(args.seed, epoch))  # the scorer's sampling
    chosen = draw_prompts(run.items, state["banned"], args.prompts_per_epoch, rng)
    if not chosen:
        return None
    chosen = with_sources(chosen, args.resolution)
    group = [it for it in chosen for _ in range(K)]                   # K samples per prompt
    group_ids = [g for g in range(len(chosen)) for _ in range(K)]
    seeds = [rng.randrange(2 ** 31) for _ in group]
    conds = encode_conditions(run.pipe, chosen, run.geo)               # this epoch's prompts only
    cond = collate(conds, [it["key"] for it in group], "cpu", torch.float32)
    # ---- 1. collect with the old policy: K samples per prompt, clean latents only ----
    mine = common.my_share(len(chosen))  # several processes: this rank's prompt groups
    idx = [g * K + k for g in mine for k in range(K)]                 # this rank's samples
    x0 = torch.cat([sample_latents(run.pipe, {k: v[g * K:g * K + K] for k, v in cond.items()},
                                   seeds[g * K:g * K + K], run.sigmas, run.geo, "old", "dpm2")
                    for g in mine])                                    # (n, ...)
    # ---- 2. reward: decode, critique, R from the scores; optimality r and the mask ----
    res = reward_images(run.scorer, decode(run.pipe, x0, run.geo), [group[i] for i in idx])
    x0, res = gather_samples(idx, x0.cpu(), res)                       # (N, ...): every rank's
    R = torch.tensor(res["rewards"])                                   # (N,)
    r = optimality_from_rewards(R, group_ids, args.adv_clip)           # (N,)
    keep = train_mask(R, group_ids, args.mask)                         # (N,)
    if args.mask == "official":
        ban = [chosen[g]["key"] for g in groups_to_ban(R, group_ids)]
        state["banned"] += [k for k in dict.fromkeys(ban) if k not in state["banned"]]
    # ---- 3. optimise the NFT loss over the epoch's samples ----
    state["step"], totals = optimise_epoch(run, Collected(x0, cond, r, keep), gen, state["step"])
    # ---- 4. the old policy moves toward theta ----
    eta = old_policy_decay(state["step"])
    soft_update(run.pipe.transformer, eta)
    return {"R": R, "res": res, "keep": keep, "totals": totals or {}, "eta": eta}


# =======================================================================================
# The method ends here. Below: the harness of the `rl_nft` command (its flags and per-task
# defaults, prompt files, several processes, checkpoints, metrics and pictures, `main`).
# =======================================================================================
# --help order: _Method's flags, ScorerFlags', then Args' own (dataclass fields: bases reversed)
@dataclass
class _Method:
    task: Literal["t2i", "edit"] = "t2i"
    """t2i: SD3.5-Medium, as DiffusionNFT; edit: FLUX.1-Kontext-dev, as the official RL"""
    generator: Optional[str] = common.default_text("SD3.5-Medium t2i, FLUX.1-Kontext-dev edit")
    """hub id, local folder or tiny-random"""
    generator_quantization: Literal["none", "4bit"] = "none"
    """4bit: transformer and T5 in nf4, LoRA in fp32 on top (QLoRA; a GPU; Kontext on 24 GB)"""
    t5: bool = True
    """SD3: load the T5 text encoder (--no-t5 saves its memory, at some prompt fidelity)"""
    prompts: Optional[str] = common.default_text("prompts/rl_prompts.txt t2i, rl_edits.jsonl edit")
    """.txt or .jsonl (edit: `source_image` per line, relative to the file)"""
    resolution: Optional[int] = common.default_text("512 as both sources; 64 for tiny-random")
    """image side in pixels"""
    epochs: int = 50
    """collect -> reward -> optimise -> update rounds"""
    prompts_per_epoch: int = 4
    """prompts drawn per epoch"""
    group_size: int = 4
    """K: images per prompt, the group whose mean is the baseline (sources: 24 t2i, 8 edit)"""
    sample_steps: Optional[int] = common.default_text("10 t2i as DiffusionNFT, 15 edit as official")
    """solver steps while collecting"""
    guidance_scale: Optional[float] = common.default_text("2.5 edit; t2i samples CFG-free, 1.0")
    """edit: FLUX's distilled guidance"""
    train_batch_size: int = 2
    """samples per forward pass while optimising (gradients accumulate across mini-batches)"""
    gradient_steps_per_epoch: int = 1
    """optimiser steps per epoch, each over its share of the mini-batches (sources: 1)"""
    beta: float = 1.0
    """NFT guidance strength beta (sources: config.beta = 1.0)"""
    kl_weight: float = 1e-4
    """weight of the velocity KL ||v_theta - v_ref||^2 to the base model (sources: 1e-4)"""
    adv_clip: float = 5.0
    """advantages clipped to [-adv_clip, adv_clip]; the policy term is scaled by it (sources: 5)"""
    mask: Optional[Literal["none", "official"]] = common.default_text("none t2i, official edit")
    """none (DiffusionNFT: every sample) or official (ban_prompt: global std > 0.05 and group mean
    < 0.9; groups with std < 0.05 and mean > 0.9 banned later)"""
    lora_r: int = 32
    """LoRA rank on the attention and context projections (sources: 32)"""
    lora_alpha: int = 64
    """LoRA alpha (sources: 64)"""
    lr: Optional[float] = common.default_text("3e-4 t2i as DiffusionNFT, 2e-4 edit as official")
    """AdamW learning rate"""
    grad_clip: float = 1.0
    """gradient norm clip (sources: 1.0)"""
    reward_weights: Optional[str] = common.default_text("equal t2i; image_faithfulness=0 edit")
    """e.g. 'text_rendering=2' (unnamed: 1; 0 drops one)"""

@dataclass
class Args(rr.ScorerFlags, _Method):
    out: str = "runs/nft"
    """run folder (resumable with --resume)"""
    resume: bool = False
    """continue from --out/checkpoint.pt"""
    eval_every: int = 5
    """epochs between eval grids and LoRA snapshots (the last epoch always gets both)"""
    eval_steps: Optional[int] = common.default_text("40 t2i, 20 edit: sample.eval_num_steps")
    """Euler steps of the eval grid"""
    num_eval_prompts: int = 4
    """images in the eval grid: the first N training prompts, one fixed seed each"""
    seed: int = 0
    """seed of prompt draws, sampling noise, timesteps and the scorer's sampling"""
    device: Optional[str] = common.default_text("cuda if there is a GPU")
    """where the generator and the scorer run: cuda, cuda:1, cpu"""


# Per-task defaults: t2i as DiffusionNFT's SD3 config, edit as the official Kontext config
TASK_DEFAULTS = {
    "t2i": {"generator": common.GENERATORS["t2i"],
            "prompts": str(common.PROMPTS_DIR / "rl_prompts.txt"),
            "sample_steps": 10, "eval_steps": 40, "guidance_scale": 1.0, "lr": 3e-4,
            "mask": "none", "reward_weights": None},
    "edit": {"generator": common.GENERATORS["edit"],
             "prompts": str(common.PROMPTS_DIR / "rl_edits.jsonl"),
             "sample_steps": 15, "eval_steps": 20, "guidance_scale": 2.5, "lr": 2e-4,
             "mask": "official",
             # the official _parse_scoring_response averages the three other dimensions
             "reward_weights": "image_faithfulness=0"},
}
# what the checkpoint depends on: resuming with any of these changed is refused
RUN_KEYS = ("task", "generator", "generator_quantization", "t5", "prompts", "resolution",
            "group_size", "sample_steps", "guidance_scale", "lora_r", "lora_alpha", "mask",
            "scorer", "scorer_adapter", "scorer_api_base", "reward_weights", "prompts_dir", "seed")
# what a resumed run may change, used from the next epoch on (--lr: set on the restored AdamW)
RESUME_CHANGEABLE = ("lr", "beta", "kl_weight", "adv_clip", "grad_clip", "prompts_per_epoch",
                     "train_batch_size", "gradient_steps_per_epoch", "epochs", "eval_every",
                     "eval_steps", "num_eval_prompts", "scorer_quantization",
                     "scorer_max_new_tokens", "scorer_temperature", "max_pixels")

@dataclass
class Run:
    """What an RL run holds from epoch to epoch (made by `setup_run`)."""
    args: Args
    out: Path
    pipe: object          # the diffusers pipeline; its transformer carries the two policies
    params: list          # theta's LoRA weights, trained
    optimizer: object     # AdamW over params
    ema: Optional[dict]   # theta's EMA: what eval grids and saved LoRAs use
    scorer: object        # rr.RationalRewardsScorer
    items: list           # the prompt file's items (`read_items`)
    geo: Geometry
    sigmas: object        # (S + 1,) noise levels of collection
    eval_sigmas: object   # noise levels of the eval grid
    eval_items: list      # the eval grid's items, sources loaded, and their conditions
    eval_conds: dict


# ---- Seeds: epoch e draws from its own streams, so a resumed run draws what an uninterrupted one
# did; the strides are primes above any epoch or eval-grid count, so no two streams coincide.
EPOCH_STRIDE, EVAL_STRIDE = 1_000_003, 100_003
TEXT_TOKENS = 128  # prompts are encoded at 128 tokens, as both sources (max_sequence_length)

def epoch_seed(seed: int, epoch: int) -> int:
    return seed * EPOCH_STRIDE + epoch

def epoch_generator(seed: int, epoch: int):
    """The epoch's generator: the sample order, training timesteps and forward-process noise."""
    return torch.Generator().manual_seed(epoch_seed(seed, epoch))


# ---- Inputs: prompts (t2i) or instruction + source image (edit) ----
def read_items(path: str, task: str, resolution: int) -> tuple:
    """([{key, prompt, source}], sha1 of the file and the source images' pixels); for edit `source`
    is a checked path, loaded when an epoch draws it; `key` (prompt, source) keys groups, bans."""
    items, h = [], hashlib.sha1(Path(path).read_bytes() if Path(path).is_file() else b"")
    for n, rec in enumerate(common.read_prompt_records(path), 1):
        source = None
        if task == "edit":
            rel = rec.get("source_image")
            if not rel:
                raise ValueError(
                    f"{path}: prompt {n} ({rec['prompt'][:60]!r}) has no source_image: --task edit "
                    "needs a .jsonl with 'prompt' and 'source_image' (relative to the file)")
            source = Path(path).parent / str(rel)
            image, problem = common.read_image(source)
            if image is None:
                raise ValueError(f"{path}: prompt {n}: source image {source} is {problem}")
            h.update(fit_source(image, resolution).tobytes())
        key = common.digest(rec["prompt"], rec.get("source_image") or "")
        items.append({"key": key, "prompt": rec["prompt"], "source": source})
    return items, h.hexdigest()

def fit_source(image: Image.Image, resolution: int) -> Image.Image:
    """Center-cropped to a square and resized (the official Kontext dataset's preprocessing)."""
    return ImageOps.fit(image, (resolution, resolution), Image.LANCZOS)

def with_sources(items: list, resolution: int) -> list:
    """The items with their source images loaded (edit), for one epoch or the eval grid."""
    return [{**it, "source": fit_source(common.load_image(it["source"]), resolution)}
            if it["source"] is not None else it for it in items]


# ---- Several processes: rank shares, gathered samples, one optimiser step for all ----
def loss_means(log: list) -> Optional[dict]:
    """{loss, policy, kl}: the means over every rank's `log` entries; None when none was kept."""
    rows = [row for part in common.gather(log) for row in part]
    return {k: sum(col) / len(rows) for k, col in zip(("loss", "policy", "kl"), zip(*rows))} \
        if rows else None

def optimiser_step(run: Run, problem: Optional[str], step: int) -> int:
    """One clipped AdamW step on the gradient every rank accumulated, then the EMA. A non-finite
    loss (`problem`) or gradient on any rank stops every rank before the step, with one error."""
    # an all-masked step still steps on zero gradients, as in the sources: AdamW's decay acts
    for p in run.params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    common.sum_gradients(run.params)  # several ranks: the gradient of the whole group
    norm = torch.nn.utils.clip_grad_norm_(run.params, run.args.grad_clip)
    problem = next((v for v in common.gather(problem) if v is not None), None)
    if problem is None and not torch.isfinite(norm):  # the same on every rank once summed
        problem = f"gradient norm became {float(norm)}"
    if problem is not None and common.RANK > 0:
        raise SystemExit(2)  # quietly: rank 0 says why
    if problem is not None:
        raise FloatingPointError(
            f"the NFT {problem} (optimiser step {step + 1}); nothing of this epoch is "
            "saved and the last checkpoint is intact: rerun with --resume and a lower --lr")
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    if run.ema is not None:
        ema_update(run.ema, run.pipe.transformer, step + 1)
    return step + 1

def gather_samples(idx: list, x0, res: dict) -> tuple:
    """Every rank's samples (`idx`: their places in the epoch; x0, rewards) in epoch order."""
    parts = common.gather((idx, x0, res))
    where = [i for part in parts for i in part[0]]
    order = sorted(range(len(where)), key=where.__getitem__)
    joined = {k: ([v for part in parts for v in part[2][k]] if isinstance(val, list)
                  else sum(part[2][k] for part in parts)) for k, val in res.items()}
    return (torch.cat([part[1] for part in parts])[order],
            {k: [v[i] for i in order] if isinstance(v, list) else v for k, v in joined.items()})


# ---- Outputs: eval grids, the checkpoint, metrics, LoRA files ----
@contextlib.contextmanager
def ema_weights(transformer, ema: dict):
    """theta temporarily replaced by its EMA (eval grids, saved LoRAs), then restored."""
    theta = adapter_params(transformer, "default")
    saved = {k: p.detach().clone() for k, p in theta.items()}
    with torch.no_grad():
        for k, p in theta.items():
            p.copy_(ema[k])
    try:
        yield
    finally:
        with torch.no_grad():
            for k, p in theta.items():
                p.copy_(saved[k])

def evaluate(run: Run, epoch: int) -> float:
    """eval/epoch_NNNN.png and its mean reward: EMA weights, Euler, one fixed seed per prompt."""
    its = run.eval_items
    seeds = [run.args.seed * EVAL_STRIDE + i for i in range(len(its))]
    with ema_weights(run.pipe.transformer, run.ema):
        cond = collate(run.eval_conds, [it["key"] for it in its], "cpu", torch.float32)
        x0 = sample_latents(run.pipe, cond, seeds, run.eval_sigmas, run.geo, "default", "euler")
    images = decode(run.pipe, x0, run.geo)
    res = reward_images(run.scorer, images, its)
    cells = []
    for it, im, R, s, na in zip(its, images, res["rewards"], res["scores"], res["not_applicable"]):
        caption = [*common.wrap_text(it["prompt"], 40)[:2], f"R = {R:.3f}",
                   *(rr.score_label(k, v, na) for k, v in s.items())]
        cells.append(([it["source"], im] if it["source"] else [im], caption))
    common.caption_grid(cells, run.out / "eval" / f"epoch_{epoch:04d}.png", lines=8,
                        title=f"{run.out.name}: epoch {epoch} "
                        + ("(base model)" if epoch == 0 else "(EMA weights)"))
    return sum(res["rewards"]) / len(res["rewards"])

def save_checkpoint(run: Run, state: dict) -> None:
    """checkpoint.pt, one torch.save dict: theta, the old policy, the EMA, the optimiser, and the
    run's state (epoch, step, banned prompts, metrics rows); written whole, then renamed."""
    tr = run.pipe.transformer
    ckpt = {"theta": {k: v.detach().cpu() for k, v in adapter_params(tr, "default").items()},
            "old": {k: v.detach().cpu() for k, v in adapter_params(tr, "old").items()},
            "ema": run.ema, "optimizer": run.optimizer.state_dict(), "state": state}
    tmp = run.out / "checkpoint.pt.tmp"
    with common.saving(tmp):
        torch.save(ckpt, tmp)
    tmp.replace(run.out / "checkpoint.pt")

def load_checkpoint(run: Run) -> Optional[dict]:
    """The run's state from checkpoint.pt (None if none); a damaged file or a LoRA shape named."""
    path, tr = run.out / "checkpoint.pt", run.pipe.transformer
    if not path.is_file():
        return None
    try:
        ckpt = torch.load(path, weights_only=True)
        run.optimizer.load_state_dict(ckpt["optimizer"])
        with torch.no_grad():
            for name, params in (("theta", adapter_params(tr, "default")),
                                 ("old", adapter_params(tr, "old")), ("ema", run.ema)):
                for k, p in params.items():
                    if ckpt[name][k].shape != p.shape:  # copy_ would broadcast a rank-1 LoRA
                        raise ValueError(f"{k}: {tuple(ckpt[name][k].shape)} saved, "
                                         f"{tuple(p.shape)} here")
                    p.copy_(ckpt[name][k])
    except Exception as err:  # a truncated or foreign file: torch raises several types
        raise ValueError(f"{path} is damaged, or holds another run's LoRA (another --lora-r or "
                         f"--generator than the run's?): {type(err).__name__}: {str(err)[:200]}. "
                         "Start again in another --out") from None
    return ckpt["state"]

def write_metrics(out: Path, rows: list) -> None:
    """metrics.csv, rewritten whole from the checkpoint's rows: a resumed run never repeats one."""
    text = io.StringIO()
    w = csv.DictWriter(text, list(rows[0]) if rows else ["epoch"])
    w.writeheader()
    w.writerows(rows)  # None is written as an empty cell
    common.write_atomic(out / "metrics.csv", text.getvalue())

def log_epoch(run: Run, state: dict, epoch: int, stats: dict, seconds: float) -> str:
    """What an epoch leaves: the eval grid (every --eval-every), its metrics row, LoRA snapshots,
    the checkpoint, metrics.csv and the reward curve. Returns the line to print."""
    args, out, dims = run.args, run.out, rr.dimensions(run.args.task)
    R, res, keep, totals = stats["R"], stats["res"], stats["keep"], stats["totals"]
    lead, due = common.RANK == 0, epoch + 1 == args.epochs or (epoch + 1) % args.eval_every == 0
    eval_reward = evaluate(run, epoch + 1) if lead and due else None
    row = {"epoch": epoch + 1, "step": state["step"], "reward_mean": float(R.mean()),
           "reward_std": float(R.std(unbiased=False)), **rr.dimension_means(res["scores"], dims),
           "unreadable": res["unreadable"], "truncated": res["truncated"],
           "masked_samples": int((~keep).sum()), "trained_samples": int(keep.sum()),
           "banned_prompts": len(state["banned"]), "loss": totals.get("loss"),
           "policy_loss": totals.get("policy"), "kl": totals.get("kl"), "eta": stats["eta"],
           "eval_reward": eval_reward, "seconds": round(seconds, 2)}
    state["rows"].append(row)
    state["epoch"] = epoch + 1
    if lead and due:  # the EMA of theta as a diffusers LoRA, for pipe.load_lora_weights(folder)
        from peft.utils import get_peft_model_state_dict
        with ema_weights(run.pipe.transformer, run.ema):  # saved inside: the state holds views
            lora = get_peft_model_state_dict(run.pipe.transformer, adapter_name="default")
            folder = out / "lora" / f"epoch_{epoch + 1:04d}"
            with common.saving(folder):
                type(run.pipe).save_lora_weights(str(folder), transformer_lora_layers=lora)
    if lead:
        save_checkpoint(run, state)
        write_metrics(out, state["rows"])
        common.plot_reward_curve(state["rows"], out / "reward_curve.png", dims, title=out.name)
    shown = {"R": row["reward_mean"], "std": row["reward_std"], **{k: row[k] for k in dims},
             **{k: row[k] for k in ("unreadable", "masked_samples", "loss", "kl", "eta")}}
    return f"epoch {epoch + 1}: " + " ".join(f"{k}={'-' if v is None else format(v, '.4g')}"
                                             for k, v in shown.items())


# ---- main ----
def resolve_defaults(args: Args) -> Args:
    """The task-dependent defaults filled in, so that args.json records what ran."""
    for name, value in TASK_DEFAULTS[args.task].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.resolution is None:  # both sources train at 512
        args.resolution = 64 if args.generator == "tiny-random" else 512
    return args

def validate(a: Args) -> None:
    rr.check_scorer_flags(a)
    common.require_positive(a, "epochs", "prompts_per_epoch", "sample_steps", "eval_steps",
                            "train_batch_size", "gradient_steps_per_epoch", "num_eval_prompts",
                            "eval_every", "lora_r", "resolution")
    common.require(a.group_size >= 2, "--group-size must be at least 2 (its mean is the baseline)")
    common.require(a.task == "edit" or a.guidance_scale == 1.0, "--guidance-scale is FLUX's "
                   "distilled guidance (--task edit); t2i samples CFG-free, as DiffusionNFT")
    for name in ("beta", "adv_clip", "lr", "grad_clip"):  # the loss divides by beta and the clip
        value = getattr(a, name)
        common.require(value > 0 and math.isfinite(value),
                       f"--{name.replace('_', '-')} must be > 0, got {value}")
    batches = math.ceil(a.prompts_per_epoch * a.group_size / a.train_batch_size)
    common.require(a.gradient_steps_per_epoch <= batches, f"--gradient-steps-per-epoch "
                   f"{a.gradient_steps_per_epoch} is more than the epoch's {batches} mini-batches")

def check_out_dir(out: Path, args: Args, digest: str) -> None:
    """A folder holding any trace of a run is continued only with --resume, the same settings and
    the same prompts (`digest`: file bytes, source images); never started over."""
    found = any((out / n).exists() for n in ("checkpoint.pt", "checkpoint.pt.tmp", "metrics.csv"))
    if found or args.resume:
        common.check_same_run(out, args, RUN_KEYS, extra={"prompts_sha1": digest},
                              paths=("prompts", "scorer_adapter", "prompts_dir"),
                              changeable=RESUME_CHANGEABLE)
    common.require(args.resume or not found, f"{out} already holds a run with these settings: "
                   "pass --resume to continue it, or choose another --out")

def setup_run(args: Args, out: Path, items: list, weights: Optional[dict]) -> Run:
    """The generator with two LoRA policies, the eval grid's conditions, optimiser, scorer."""
    torch.manual_seed(args.seed)
    pipe = common.load_generator(args.generator, args.task, args.device, not args.t5,
                                 args.generator_quantization)
    pipe.vae.to(torch.float32)  # as both sources (Deviation 5; the memory: docs/REFERENCE.md)
    geo = latent_geometry(pipe, args.resolution, args.guidance_scale)
    common.require(geo.kontext == (args.task == "edit"),
                   f"--task {args.task} does not fit {args.generator}, a {type(pipe).__name__}: "
                   "t2i trains SD3 pipelines, edit FLUX.1-Kontext ones")
    eval_items = with_sources(items[:args.num_eval_prompts], args.resolution)
    eval_conds = encode_conditions(pipe, eval_items, geo)  # the same grid every time: once
    gc.collect()
    torch.manual_seed(args.seed)  # the LoRA init draws from here, whatever loading consumed
    params = add_policies(pipe.transformer, args)
    pipe.transformer.enable_gradient_checkpointing()  # activations recomputed: memory for time
    pipe.transformer.train()
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-4)  # the sources' 1e-4
    ema = {k: p.detach().clone() for k, p in adapter_params(pipe.transformer, "default").items()}
    return Run(args=args, out=out, pipe=pipe, params=params, optimizer=optimizer, ema=ema,
               scorer=rr.load_scorer(args, args.task, weights), items=items, geo=geo,
               eval_items=eval_items, eval_conds=eval_conds,
               sigmas=sampler_sigmas(pipe, args.sample_steps, geo),
               eval_sigmas=sampler_sigmas(pipe, args.eval_steps, geo))

def open_run(args: Args) -> tuple:
    """(Run, state): processes joined, the run folder taken (checked against its settings and
    prompts), the models loaded and, with --resume, the checkpoint's state restored."""
    models = {"qwen3vl": args.scorer, common.TINY_KIND[args.task]: args.generator}
    tiny = [kind for kind, name in models.items() if name == "tiny-random"]
    args.device = common.init_distributed(args.device, tiny)  # several processes: see the README
    common.require(args.prompts_per_epoch >= common.WORLD,
                   f"--prompts-per-epoch {args.prompts_per_epoch} is less than the {common.WORLD} "
                   "processes: each collects whole prompt groups, at least one")
    weights = rr.parse_weights(args.reward_weights)
    items, digest = read_items(args.prompts, args.task, args.resolution)
    out = Path(args.out)
    check_out_dir(out, args, digest)
    common.start_run(out, args, extra={"prompts_sha1": digest})
    run = setup_run(args, out, items, weights)
    state = load_checkpoint(run) if args.resume else None
    for group in run.optimizer.param_groups:  # the checkpoint restored the old --lr
        group["lr"] = args.lr
    state = state or {"epoch": 0, "step": 0, "rows": [], "banned": []}
    if common.RANK == 0:
        if args.resume:
            print(f"resuming after epoch {state['epoch']} (step {state['step']})", file=sys.stderr)
        write_metrics(out, state["rows"])
        (out / "eval").mkdir(exist_ok=True)
        if state["epoch"] == 0 and not (out / "eval" / "epoch_0000.png").exists():
            evaluate(run, 0)  # the base model, before any update
    return run, state

def main(argv=None) -> int:
    """Parse the flags, open the run, then per epoch `train_epoch` (the method) and `log_epoch`."""
    from tqdm import tqdm
    args = resolve_defaults(common.parse(Args, argv, description=__doc__.split("\n\n")[0]))
    validate(args)
    run, state = open_run(args)
    lead = common.RANK == 0  # rank 0 alone writes and prints; every rank computes
    bar = tqdm(range(state["epoch"], args.epochs), desc="epochs", unit="epoch",
               initial=state["epoch"], total=args.epochs, disable=not lead)
    for epoch in bar:
        t0 = time.time()
        stats = train_epoch(run, state, epoch)
        line = log_epoch(run, state, epoch, stats, time.time() - t0) if stats else \
            f"every prompt is banned (group std < 0.05, mean > 0.9): stopping after epoch {epoch}"
        if lead:
            bar.write(line)
        if stats is None:
            break
    if lead:
        print(f"done: {state['epoch']} epochs, {state['step']} optimiser steps; metrics in "
              f"{run.out / 'metrics.csv'}")
    return 0

def cli() -> None:
    """The `rl-nft` command (pyproject.toml)."""
    common.run(main, rerun="run the same command with --resume")


if __name__ == "__main__":
    cli()
