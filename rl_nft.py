"""DiffusionNFT with LoRA on a flow-matching text-to-image model, rewarded by the critique scorer.

Implements the training-time half of Sec. 2.2 of "RationalRewards: Reasoning Rewards Scale
Visual Generation Both Training and Test Time" (arXiv 2604.11626): the scorer's per-dimension
critique scores, aggregated into R in [0, 1], are the reward of DiffusionNFT (Zheng et al.,
"DiffusionNFT: Online Diffusion Reinforcement with Forward Process"; facts about its loss and
schedule are taken from the NVlabs/DiffusionNFT code and the official RationalRewards RL
configs, as named in the comments).

Each epoch:
  1. collect   the frozen old policy samples K images per prompt with the deterministic
               flow-matching ODE (Euler, CFG 1.0); only the final clean latents x0 are kept;
  2. reward    images are decoded and critiqued; R = (mean readable score - 1) / 3;
  3. optimise  the NFT loss on (x0, r) at the sampler's own timesteps; r in [0, 1] is the
               "optimality" of a sample within its prompt group;
  4. old <- eta old + (1 - eta) theta.

Notation (shapes in comments): B samples, C latent channels, h x w latent size.
    x0  clean latent of a collected sample     eps ~ N(0, I)     t in (0, 1] (sigma)
    x_t = (1 - t) x0 + t eps                   v = eps - x0 (the flow-matching velocity)
    v_theta / v_old / v_ref                     velocities of the trained, old and base policies
    R   reward in [0, 1]      A  group-normalised advantage      r  optimality in [0, 1]

Smoke run (CPU, offline, well under a minute)::

    python rl_nft.py --generator tiny-random --scorer tiny-random --epochs 2

Real run (one 24 GB GPU: SD3.5-Medium with LoRA in bf16, the released scorer in 4-bit)::

    python rl_nft.py --prompts prompts/rl_prompts.txt --out runs/nft
    python rl_nft.py ... --scorer Qwen/Qwen3-VL-2B-Instruct --scorer-adapter runs/parrot/student
    python rl_nft.py ... --scorer-api-base http://localhost:8000/v1     # a served scorer (vLLM)

Outputs in --out: metrics.csv, reward_curve.png, eval/epoch_NNNN.png, lora/epoch_NNNN/ (each
loadable with diffusers `pipe.load_lora_weights`), checkpoint/ (resume), args.json.

Deviations from the paper and from DiffusionNFT:
1. Scale: 512 px, K=4 images per prompt and 4 prompts per epoch by default (paper and the
   official configs: K=8, many more prompts, multi-GPU); see the README for the table.
2. The loss is the formula of DESIGN.md, policy term + kl_weight * KL. The DiffusionNFT code
   also multiplies the policy term by the advantage clip (5), which only rescales it against
   the KL term (equivalent to a 5x smaller kl_weight); we do not.
3. One optimiser step per mini-batch of samples, after its loss at all training timesteps
   (gradients accumulated), as in DiffusionNFT; no multi-GPU gradient accumulation.
4. The reward averages every readable dimension (official T2I RL: the same); `--reward-weights`
   reweights or drops dimensions.
"""
import csv
import dataclasses
import json
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from PIL import Image, ImageDraw

import rationalrewards as rr


@dataclass
class Args(rr.ScorerArgs):
    prompts: str = "prompts/rl_prompts.txt"
    """training prompts: .txt (one per line) or .jsonl (a `prompt` field per line)"""
    eval_prompts: Optional[str] = None
    """prompts for the eval grid (default: the first --num-eval-prompts training prompts)"""
    num_eval_prompts: int = 4
    """images in the eval grid (one fixed seed per prompt)"""
    out: str = "runs/nft"
    """run directory"""
    generator: str = "stabilityai/stable-diffusion-3.5-medium"
    """flow-matching text-to-image pipeline (hub id, local directory, or tiny-random)"""
    no_t5: bool = False
    """leave SD3's T5 text encoder out (saves its memory while prompts are encoded, at some prompt fidelity)"""
    resolution: Optional[int] = None
    """image side in pixels (default 512; 64 for tiny-random)"""
    epochs: int = 50
    """collect -> reward -> optimise rounds"""
    prompts_per_epoch: int = 4
    """prompts drawn per epoch"""
    group_size: int = 4
    """K: images per prompt, the group whose mean is the baseline (official config: 8)"""
    sample_steps: int = 10
    """Euler steps of the deterministic ODE sampler (DiffusionNFT: about 10)"""
    guidance_scale: float = 1.0
    """classifier-free guidance while collecting and evaluating (DiffusionNFT: 1.0, no CFG)"""
    timestep_fraction: float = 0.99
    """share of the sampler's timesteps each sample is trained at (DiffusionNFT: 0.99)"""
    train_batch_size: int = 2
    """samples per forward pass while optimising"""
    beta: float = 1.0
    """NFT guidance strength beta (DiffusionNFT and the official config: 1.0)"""
    kl_weight: float = 1e-4
    """weight of ||v_theta - v_ref||^2 against the base model (official config: 1e-4)"""
    adv_clip: float = 5.0
    """advantages are clipped to [-adv_clip, adv_clip] before the map to r in [0, 1]"""
    mask_std: float = 0.05
    """groups whose reward std is below this AND ..."""
    mask_mean: float = 0.9
    """... whose mean is above this carry no signal and are not trained on (official config)"""
    lora_r: int = 32
    """LoRA rank on the attention projections, context projections included (official: 32)"""
    lora_alpha: int = 64
    """LoRA alpha (official: 64)"""
    lr: float = 3e-4
    """AdamW learning rate (official: 3e-4)"""
    weight_decay: float = 1e-4
    """AdamW weight decay"""
    grad_clip: float = 1.0
    """gradient norm clip"""
    eta_rate: float = 0.001
    """old-policy decay: eta = min(eta_rate * step, eta_max)"""
    eta_max: float = 0.5
    """upper bound of eta"""
    reward_weights: Optional[str] = None
    """per-dimension reward weights, e.g. 'text_rendering=2,physical_quality=1' (unnamed: 1; 0 drops one)"""
    eval_every: int = 5
    """epochs between eval grids (the last epoch always gets one)"""
    save_every: int = 10
    """epochs between LoRA snapshots in lora/ (the checkpoint for --resume is written every epoch)"""
    gradient_checkpointing: bool = True
    """recompute transformer activations in the backward pass (memory for time)"""
    resume: bool = False
    """continue from --out/checkpoint"""
    seed: int = 0
    """seed of prompt draws, sampling noise, timesteps and the scorer's sampling"""


# what the checkpoint depends on: resuming with any of these changed is refused
RUN_KEYS = ("generator", "prompts", "prompts_dir", "resolution", "group_size", "sample_steps", "lora_r", "lora_alpha", "scorer",
            "scorer_adapter", "scorer_api_base", "reward_weights", "seed")
TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]


# ---------------------------------------------------------------------------------------
# Pure functions: rewards -> optimality, the NFT loss, the old-policy schedule
# ---------------------------------------------------------------------------------------
def optimality_from_rewards(rewards, group_ids, adv_clip: float = 5.0):
    """r in [0, 1] for each sample from its reward and its prompt group.

    A = (R - mean_of_prompt_group) / (std_global + 1e-4),  A <- clip(A, -c, c),  r = 0.5 + 0.5 A / c
    """
    import torch
    R = torch.as_tensor(rewards, dtype=torch.float64)          # (N,)
    g = torch.as_tensor(group_ids)                              # (N,)
    group_mean = torch.zeros_like(R)
    for gid in g.unique():
        group_mean[g == gid] = R[g == gid].mean()
    A = (R - group_mean) / (R.std(unbiased=False) + 1e-4)      # global std (population)
    A = A.clamp(-adv_clip, adv_clip)
    return (0.5 + 0.5 * A / adv_clip).float()                  # (N,)


def flat_group_mask(rewards, group_ids, min_std: float = 0.05, max_mean: float = 0.9):
    """False for samples of groups whose rewards barely vary and are already high (no signal)."""
    import torch
    R, g = torch.as_tensor(rewards, dtype=torch.float64), torch.as_tensor(group_ids)
    keep = torch.ones(len(R), dtype=torch.bool)
    for gid in g.unique():
        sel = g == gid
        if R[sel].std(unbiased=False) < min_std and R[sel].mean() > max_mean:
            keep[sel] = False
    return keep


def nft_loss(v_theta, v_old, v_ref, x_t, x0, t, r, beta: float = 1.0, kl_weight: float = 1e-4):
    """The DiffusionNFT objective for one timestep per sample. Returns (loss, {policy, kl}).

    v_theta, v_old, v_ref, x_t, x0: (B, C, h, w); t, r: (B,).
    """
    t = t.view(-1, 1, 1, 1)                                     # (B, 1, 1, 1)
    # implicit positive and negative policies around the old one
    # v+ = beta v_theta + (1 - beta) v_old ;  v- = (1 + beta) v_old - beta v_theta
    v_pos = beta * v_theta + (1 - beta) * v_old                 # (B, C, h, w)
    v_neg = (1 + beta) * v_old - beta * v_theta
    # x0 predictions from x_t = (1 - t) x0 + t eps and v = eps - x0:  x0_hat = x_t - t v
    x0_pos, x0_neg = x_t - t * v_pos, x_t - t * v_neg

    def adaptive_mse(x0_hat):
        # L = mean((x0_hat - x0)^2) / sg(max(mean|x0_hat - x0|, 1e-5)), per sample
        err = x0_hat - x0
        weight = err.detach().abs().mean(dim=(1, 2, 3)).clamp(min=1e-5)   # (B,), no gradient
        return (err ** 2).mean(dim=(1, 2, 3)) / weight                     # (B,)

    # policy term: r pulls v+ toward x0, (1 - r) pulls v- toward x0
    policy = (r * adaptive_mse(x0_pos) + (1 - r) * adaptive_mse(x0_neg)).mean() / beta
    # KL to the base model (adapters off): mean ||v_theta - v_ref||^2
    kl = ((v_theta - v_ref) ** 2).mean()
    return policy + kl_weight * kl, {"policy": float(policy.detach()), "kl": float(kl.detach())}


def old_policy_decay(step: int, rate: float = 0.001, max_eta: float = 0.5) -> float:
    """eta = min(rate * step, max_eta): the old policy trails theta more as training goes on."""
    return min(rate * step, max_eta)


# ---------------------------------------------------------------------------------------
# The two policies on one transformer: LoRA "default" (theta, trained) and "old" (samples)
# ---------------------------------------------------------------------------------------
def add_policies(transformer, args: Args) -> list:
    """Adds both adapters (old = theta at the start) and returns theta's trainable parameters."""
    import torch
    from peft import LoraConfig
    import warnings
    transformer.requires_grad_(False)
    for name in ("default", "old"):
        with warnings.catch_warnings():  # peft warns that a second adapter is being added: that is the point
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            transformer.add_adapter(LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, init_lora_weights="gaussian",
                                               target_modules=TARGET_MODULES), adapter_name=name)
    theta, old = adapter_params(transformer, "default"), adapter_params(transformer, "old")
    with torch.no_grad():
        for k, p in theta.items():
            p.data = p.data.float()  # LoRA weights train in fp32 even when the base model is bf16
            old[k].data = p.data.clone()
    use_policy(transformer, "default")
    return list(theta.values())


def adapter_params(transformer, adapter: str) -> dict:
    """{module path: parameter} of one adapter's LoRA weights, keyed without the adapter name."""
    tag = f".{adapter}."
    return {n.replace(tag, "."): p for n, p in transformer.named_parameters() if "lora_" in n and tag in n}


def use_policy(transformer, policy: Optional[str]) -> None:
    """Route forward passes through one adapter ("default" or "old"), or through the base model (None)."""
    if policy is None:
        transformer.disable_adapters()
        return
    transformer.enable_adapters()
    transformer.set_adapter(policy)
    # peft's set_adapter makes the active adapter trainable; only theta ever is
    for n, p in transformer.named_parameters():
        if "lora_" in n:
            p.requires_grad_(".default." in n)


def soft_update(transformer, eta: float) -> None:
    """old <- eta old + (1 - eta) theta, on every LoRA weight."""
    import torch
    theta, old = adapter_params(transformer, "default"), adapter_params(transformer, "old")
    with torch.no_grad():
        for k, p in old.items():
            p.mul_(eta).add_(theta[k].detach().to(p.dtype), alpha=1 - eta)


# ---------------------------------------------------------------------------------------
# Sampling (collect and eval), decoding, rewards
# ---------------------------------------------------------------------------------------
def encode_prompts(pipe, prompts: list) -> dict:
    """prompt -> (prompt_embeds (1, L, D), pooled (1, P)), computed once; the encoders are freed after."""
    import torch
    cache = {}
    with torch.no_grad():
        for p in dict.fromkeys(prompts):
            emb, _, pooled, _ = pipe.encode_prompt(prompt=p, prompt_2=p, prompt_3=p, do_classifier_free_guidance=False)
            cache[p] = (emb.cpu(), pooled.cpu())
    return cache


def free_text_encoders(pipe) -> None:
    import gc
    import torch
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        if getattr(pipe, name, None) is not None:
            setattr(pipe, name, None)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def velocity(transformer, x, t, emb, pooled):
    """v(x_t, t | prompt) from the transformer; t in (0, 1] is passed as SD3's timestep t * 1000."""
    return transformer(hidden_states=x, timestep=t * 1000, encoder_hidden_states=emb, pooled_projections=pooled,
                       return_dict=False)[0]


def sample_latents(pipe, embeds: list, seeds: list, args: Args, policy: str, null_embed=None):
    """Deterministic Euler ODE from noise (one seed per sample) to x0: (B, C, h, w).

    With --guidance-scale > 1, classifier-free guidance against `null_embed` (the empty prompt)."""
    import torch
    tr, device = pipe.transformer, pipe.transformer.device
    side = args.resolution // pipe.vae_scale_factor
    noise = torch.stack([torch.randn(tr.config.in_channels, side, side, generator=torch.Generator().manual_seed(s))
                         for s in seeds]).to(device, tr.dtype)                  # (B, C, h, w)
    emb = torch.cat([e for e, _ in embeds]).to(device, tr.dtype)               # (B, L, D)
    pooled = torch.cat([p for _, p in embeds]).to(device, tr.dtype)            # (B, P)
    sigmas = sampler_sigmas(pipe, args.sample_steps).to(device)                # (S + 1,), ends at 0
    use_policy(tr, policy)
    x = noise
    with torch.no_grad():
        for i in range(args.sample_steps):
            t = sigmas[i].expand(len(x)).to(tr.dtype)
            v = velocity(tr, x, t, emb, pooled)
            if args.guidance_scale > 1.0:
                e0, p0 = null_embed
                v0 = velocity(tr, x, t, e0.to(device, tr.dtype).expand_as(emb), p0.to(device, tr.dtype).expand_as(pooled))
                v = v0 + args.guidance_scale * (v - v0)
            x = x + (sigmas[i + 1] - sigmas[i]) * v                            # Euler: dx = v dt
    use_policy(tr, "default")
    return x.float()


def sampler_sigmas(pipe, steps: int):
    """The scheduler's own (shifted) noise levels for `steps` steps, plus the final 0."""
    pipe.scheduler.set_timesteps(steps, device="cpu")
    return pipe.scheduler.sigmas.float().clone()


def decode(pipe, x0) -> list:
    import torch
    vae = pipe.vae
    with torch.no_grad():
        z = x0.to(vae.device, vae.dtype) / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
        images = vae.decode(z, return_dict=False)[0]
    return pipe.image_processor.postprocess(images.float(), output_type="pil")


def reward_images(scorer, images: list, prompts: list, weights) -> dict:
    """Critique every image (batched); R per image, per-dimension scores, unreadable count."""
    from tqdm import tqdm
    critiques = []
    step = max(1, getattr(scorer.backend, "batch_size", 8))  # HTTP backends have no batch size: 8 per bar step
    for i in tqdm(range(0, len(images), step), desc="reward: critiques", unit="batch", leave=False):
        critiques += scorer.critique(images[i:i + step], prompts[i:i + step])
    return {"rewards": [rr.aggregate(c.scores, weights) for c in critiques],
            "scores": [c.scores for c in critiques],
            "unreadable": sum(not c.readable for c in critiques)}


def dimension_means(scores: list) -> dict:
    out = {}
    for d in rr.T2I_DIMENSIONS:
        vals = [s[d] for s in scores if s.get(d) is not None]
        out[d] = sum(vals) / len(vals) if vals else None
    return out


# ---------------------------------------------------------------------------------------
# ---- Optimise: one NFT update over a mini-batch of collected samples ----
# ---------------------------------------------------------------------------------------
def nft_update(transformer, optimizer, params, x0, emb, pooled, r, train_sigmas, args: Args, gen) -> dict:
    """Loss at every training timestep of each sample (its own random order), gradients accumulated,
    then one clipped optimiser step. x0: (B, C, h, w); emb: (B, L, D); pooled: (B, P); r: (B,)."""
    import torch
    device, dtype = transformer.device, transformer.dtype
    x0, r = x0.to(device), r.to(device)
    emb, pooled = emb.to(device, dtype), pooled.to(device, dtype)
    n = len(train_sigmas)
    order = torch.stack([torch.randperm(n, generator=gen) for _ in range(len(x0))])   # (B, n): fresh per sample
    totals = {"loss": 0.0, "policy": 0.0, "kl": 0.0}
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    for j in range(n):
        t = train_sigmas[order[:, j]].to(device)                                    # (B,)
        eps = torch.randn(x0.shape, generator=gen).to(device)                       # (B, C, h, w)
        # forward process: x_t = (1 - t) x0 + t eps
        x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps
        xt_in, t_in = x_t.to(dtype), t.to(dtype)
        with torch.no_grad(), autocast:
            use_policy(transformer, "old")
            v_old = velocity(transformer, xt_in, t_in, emb, pooled).float()
            use_policy(transformer, None)
            v_ref = velocity(transformer, xt_in, t_in, emb, pooled).float()
        use_policy(transformer, "default")
        with autocast:
            v_theta = velocity(transformer, xt_in, t_in, emb, pooled).float()
        loss, stats = nft_loss(v_theta, v_old, v_ref, x_t, x0, t, r, args.beta, args.kl_weight)
        (loss / n).backward()
        totals["loss"] += float(loss.detach()) / n
        totals["policy"] += stats["policy"] / n
        totals["kl"] += stats["kl"] / n
    torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return totals


# ---------------------------------------------------------------------------------------
# Outputs: LoRA files, checkpoint, metrics, pictures
# ---------------------------------------------------------------------------------------
def save_lora(pipe, directory: Path) -> None:
    """theta as a diffusers LoRA file: `pipe.load_lora_weights(directory)` loads it into SD3."""
    from peft.utils import get_peft_model_state_dict
    state = get_peft_model_state_dict(pipe.transformer, adapter_name="default")
    type(pipe).save_lora_weights(str(directory), transformer_lora_layers=state)


def save_checkpoint(pipe, optimizer, out: Path, state: dict) -> None:
    """checkpoint/: theta (diffusers LoRA), old policy, optimiser, epoch, step, metrics rows; swapped in atomically."""
    import torch
    from safetensors.torch import save_file
    tmp, final = out / "checkpoint.tmp", out / "checkpoint"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_lora(pipe, tmp)
    tr = pipe.transformer
    save_file({k: v.detach().contiguous().cpu() for k, v in adapter_params(tr, "default").items()}, tmp / "theta.safetensors")
    save_file({k: v.detach().contiguous().cpu() for k, v in adapter_params(tr, "old").items()}, tmp / "old.safetensors")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps(state))
    if final.exists():
        final.rename(out / "checkpoint.old")
    tmp.rename(final)
    shutil.rmtree(out / "checkpoint.old", ignore_errors=True)


def load_checkpoint(pipe, optimizer, out: Path) -> Optional[dict]:
    import torch
    from safetensors.torch import load_file
    ckpt = out / "checkpoint"
    if not (ckpt / "state.json").is_file():
        if (out / "checkpoint.old" / "state.json").is_file():  # killed between the two renames
            (out / "checkpoint.old").rename(ckpt)
        else:
            return None
    tr = pipe.transformer
    for name, file in (("default", "theta.safetensors"), ("old", "old.safetensors")):
        saved, params = load_file(ckpt / file), adapter_params(tr, name)
        if set(saved) != set(params):
            raise ValueError(f"{ckpt / file} does not match this model's LoRA layout (other --generator or --lora-r?)")
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(saved[k])
    optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
    return json.loads((ckpt / "state.json").read_text())


METRIC_FIELDS = ["epoch", "step", "reward_mean", "reward_std", *rr.T2I_DIMENSIONS, "unreadable", "masked_samples",
                 "trained_samples", "loss", "policy_loss", "kl", "eta", "eval_reward", "seconds"]


def write_metrics(out: Path, rows: list) -> None:
    """metrics.csv rewritten whole from the rows the checkpoint holds: a resumed run never duplicates one."""
    tmp = out / "metrics.csv.tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, METRIC_FIELDS)
        w.writeheader()
        w.writerows([{k: ("" if row.get(k) is None else row[k]) for k in METRIC_FIELDS} for row in rows])
    tmp.replace(out / "metrics.csv")


def plot_reward_curve(rows: list, path: Path) -> None:
    """One line per dimension (scores mapped to [0, 1] like the reward) and one for R, per epoch."""
    W, H, m = 720, 420, 50
    img = Image.new("RGB", (W, H), "white")
    d, font = ImageDraw.Draw(img), rr.label_font(12)
    d.rectangle([m, m // 2, W - m // 2 - 150, H - m], outline="black")
    x_max = max(2, len(rows))
    px = lambda i: m + (W - 2 * m - 125) * i / (x_max - 1)
    py = lambda v: H - m - (H - 1.5 * m) * v
    for v in (0, 0.25, 0.5, 0.75, 1.0):
        d.line([m - 4, py(v), m, py(v)], fill="black")
        d.text((8, py(v) - 6), f"{v:.2f}", fill="black", font=font)
    d.text((m, H - m + 8), f"epoch 1 .. {len(rows)}", fill="black", font=font)
    series = [("reward R", "black", lambda r: r["reward_mean"])]
    colours = {"text_faithfulness": (200, 40, 40), "physical_quality": (40, 120, 200), "text_rendering": (40, 160, 60)}
    series += [(f"{k.replace('_', ' ')} (s-1)/3", c, lambda r, k=k: None if r[k] is None else (r[k] - 1) / 3)
               for k, c in colours.items()]
    for n, (name, colour, get) in enumerate(series):
        pts = [(px(i), py(get(r))) for i, r in enumerate(rows) if get(r) is not None]
        if len(pts) > 1:
            d.line(pts, fill=colour, width=2)
        for x, y in pts:
            d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
        d.line([W - 160, 40 + 18 * n, W - 140, 40 + 18 * n], fill=colour, width=3)
        d.text((W - 135, 33 + 18 * n), name, fill="black", font=font)
    img.save(path)


def eval_grid(images: list, prompts: list, rewards: list, scores: list, path: Path) -> None:
    """The eval images side by side, each with its reward and per-dimension scores under it."""
    side = 256  # every image is shown at this size, small ones scaled up without smoothing
    cell_h, font = side + 70, rr.label_font(11)
    grid = Image.new("RGB", (side * len(images), cell_h), "white")
    d = ImageDraw.Draw(grid)
    for i, (im, p, R, s) in enumerate(zip(images, prompts, rewards, scores)):
        grid.paste(im.resize((side, side), Image.NEAREST if im.width < side else Image.BICUBIC), (i * side, 0))
        lines = [p[:side // 6], f"R = {R:.3f}"] + [f"{rr.DIMENSION_TITLES[k]}: {'-' if v is None else f'{v:.1f}'}"
                                                     for k, v in s.items()]
        for j, line in enumerate(lines[:5]):
            d.text((i * side + 3, side + 3 + 13 * j), line, fill="black", font=font)
    grid.save(path)


# ---------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------
def main(argv=None) -> int:
    args = rr.parse_args(Args, argv, description=__doc__.split("\n\n")[0])
    rr.set_prompts_dir(args.prompts_dir)
    rr.require_positive(args, "epochs", "prompts_per_epoch", "group_size", "sample_steps", "train_batch_size",
                        "num_eval_prompts", "eval_every", "save_every", "lora_r", "resolution", "scorer_batch_size")
    if args.group_size < 2:
        raise SystemExit("--group-size must be at least 2: the group mean is the baseline of each sample")
    if not 0 < args.timestep_fraction <= 1:
        raise SystemExit("--timestep-fraction must be in (0, 1]")
    weights = rr.parse_weights(args.reward_weights)
    args.resolution = args.resolution or (64 if args.generator == "tiny-random" else 512)
    prompts = rr.read_prompt_list(args.prompts)
    eval_prompts = (rr.read_prompt_list(args.eval_prompts) if args.eval_prompts else prompts)[:args.num_eval_prompts]
    out = Path(args.out)
    if (out / "checkpoint").exists() and not args.resume:
        raise SystemExit(f"{out} already holds a run: pass --resume to continue it, or choose another --out")
    if args.resume:
        rr.check_same_run(out, args, RUN_KEYS, paths=("prompts", "scorer_adapter"))
    rr.save_args(args, out)
    print(json.dumps(dataclasses.asdict(args)), file=sys.stderr)
    import torch
    from tqdm import tqdm

    # ---- setup: generator with two LoRA policies, prompt embeddings once, the scorer ----
    torch.manual_seed(args.seed)
    pipe = rr.load_generator(args.generator, no_t5=args.no_t5)
    if args.resolution % (pipe.vae_scale_factor * pipe.transformer.config.patch_size):
        raise SystemExit(f"--resolution must be a multiple of {pipe.vae_scale_factor * pipe.transformer.config.patch_size}")
    embeds = encode_prompts(pipe, prompts + eval_prompts + [""])
    free_text_encoders(pipe)
    transformer = pipe.transformer
    params = add_policies(transformer, args)
    if args.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.train()
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    scorer = rr.build_scorer(args, "t2i", weights)
    sigmas = sampler_sigmas(pipe, args.sample_steps)
    # the sampler's own shifted timesteps, the smallest (nearly clean) ones left out
    train_sigmas = sigmas[:max(1, int(args.sample_steps * args.timestep_fraction))]
    eval_seeds = [args.seed * 100003 + i for i in range(len(eval_prompts))]

    state = load_checkpoint(pipe, optimizer, out) if args.resume else None
    state = state or {"epoch": 0, "step": 0, "rows": []}
    if args.resume:
        print(f"resuming after epoch {state['epoch']} (step {state['step']})", file=sys.stderr)
    write_metrics(out, state["rows"])
    (out / "eval").mkdir(parents=True, exist_ok=True)

    def evaluate(tag: str) -> float:
        x0 = sample_latents(pipe, [embeds[p] for p in eval_prompts], eval_seeds, args, "default", embeds[""])
        images = decode(pipe, x0)
        res = reward_images(scorer, images, eval_prompts, weights)
        eval_grid(images, eval_prompts, res["rewards"], res["scores"], out / "eval" / f"{tag}.png")
        return sum(res["rewards"]) / len(res["rewards"])

    if state["epoch"] == 0 and not (out / "eval" / "epoch_0000.png").exists():
        evaluate("epoch_0000")  # the base model, before any update
    bar = tqdm(range(state["epoch"], args.epochs), desc="epochs", unit="epoch", initial=state["epoch"], total=args.epochs)
    for epoch in bar:
        t0 = time.time()
        rng = random.Random(f"{args.seed}:{epoch}")
        gen = torch.Generator().manual_seed(args.seed * 1000003 + epoch)
        torch.manual_seed(args.seed * 1000003 + epoch)  # the scorer's sampling
        # ---- 1. collect with the old policy: K samples per prompt, clean latents only ----
        chosen = rng.sample(prompts, min(args.prompts_per_epoch, len(prompts)))
        chosen += [rng.choice(prompts) for _ in range(args.prompts_per_epoch - len(chosen))]
        group_prompts = [p for p in chosen for _ in range(args.group_size)]
        group_ids = [g for g in range(len(chosen)) for _ in range(args.group_size)]
        seeds = [rng.randrange(2 ** 31) for _ in group_prompts]
        x0 = torch.cat([sample_latents(pipe, [embeds[p] for p in group_prompts[i:i + args.group_size]],
                                       seeds[i:i + args.group_size], args, "old", embeds[""])
                        for i in range(0, len(group_prompts), args.group_size)])          # (N, C, h, w)
        # ---- 2. reward: decode, critique, aggregate ----
        res = reward_images(scorer, decode(pipe, x0), group_prompts, weights)
        R = torch.tensor(res["rewards"])
        r = optimality_from_rewards(R, group_ids, args.adv_clip)                           # (N,)
        keep = flat_group_mask(R, group_ids, args.mask_std, args.mask_mean)
        # ---- 3. optimise the NFT loss on the kept samples ----
        idx = torch.nonzero(keep).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        totals = []
        for i in range(0, len(idx), args.train_batch_size):
            b = idx[i:i + args.train_batch_size]
            emb = torch.cat([embeds[group_prompts[k]][0] for k in b])
            pooled = torch.cat([embeds[group_prompts[k]][1] for k in b])
            totals.append(nft_update(transformer, optimizer, params, x0[b], emb, pooled, r[b], train_sigmas, args, gen))
            state["step"] += 1
        # ---- 4. the old policy moves toward theta ----
        eta = old_policy_decay(state["step"], args.eta_rate, args.eta_max)
        soft_update(transformer, eta)
        last = epoch + 1 == args.epochs
        eval_reward = evaluate(f"epoch_{epoch + 1:04d}") if last or (epoch + 1) % args.eval_every == 0 else None
        mean = lambda k: sum(t[k] for t in totals) / len(totals) if totals else None
        row = {"epoch": epoch + 1, "step": state["step"], "reward_mean": float(R.mean()),
               "reward_std": float(R.std(unbiased=False)), **dimension_means(res["scores"]),
               "unreadable": res["unreadable"], "masked_samples": int((~keep).sum()), "trained_samples": len(idx),
               "loss": mean("loss"), "policy_loss": mean("policy"), "kl": mean("kl"), "eta": eta,
               "eval_reward": eval_reward, "seconds": round(time.time() - t0, 2)}
        state["rows"].append(row)
        state["epoch"] = epoch + 1
        if last or (epoch + 1) % args.save_every == 0:
            save_lora(pipe, out / "lora" / f"epoch_{epoch + 1:04d}")
        save_checkpoint(pipe, optimizer, out, state)
        write_metrics(out, state["rows"])
        plot_reward_curve(state["rows"], out / "reward_curve.png")
        fmt = lambda v, spec=".3f": "-" if v is None else format(v, spec)
        dims = " ".join(f"{k}={fmt(row[k], '.2f')}" for k in rr.T2I_DIMENSIONS)
        bar.write(f"epoch {epoch + 1}: R={fmt(row['reward_mean'])}±{fmt(row['reward_std'])} {dims} "
                  f"unreadable={row['unreadable']} loss={fmt(row['loss'], '.4f')} kl={fmt(row['kl'], '.2e')} eta={eta:.3f}")
    print(f"done: {state['epoch']} epochs, {state['step']} steps; metrics in {out / 'metrics.csv'}")
    return 0


if __name__ == "__main__":
    rr.cli_entry(main)
