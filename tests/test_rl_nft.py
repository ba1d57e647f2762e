"""rl_nft.py: the NFT loss and optimality on hand-computed numbers, the policies on a tiny SD3,
the reward path with scripted critiques, and the CLI (smoke, resume, LoRA files)."""
import base64
import csv
import io
import json

import pytest
import torch
from PIL import Image

import common
import rationalrewards as rr
import rl_nft
from conftest import images_in, optimise, text_in


def as_latent(values):
    return torch.tensor(values, dtype=torch.float32).view(1, 1, 1, -1)  # (B=1, C=1, h=1, w=N)


# ---- the loss, by hand ----
# x0 = [1, 2], x_t = [3, 3], t = 0.5, v_theta = [2, 1], v_old = [1, 1], v_ref = [0, 0]
X0, XT, T = as_latent([1, 2]), as_latent([3, 3]), torch.tensor([0.5])
V_THETA, V_OLD, V_REF = as_latent([2, 1]), as_latent([1, 1]), as_latent([0, 0])


@pytest.mark.parametrize("beta,r,expected_policy", [
    # beta 1: v+ = v_theta = [2, 1] -> x0+ = [2, 2.5], err [1, .5]: mse .625 / w .75 = 0.8333
    (1.0, 1.0, 0.625 / 0.75),
    # beta 1: v- = 2 v_old - v_theta = [0, 1] -> x0- = [3, 2.5], err [2, .5]:
    #         mse 2.125 / w 1.25 = 1.7
    (1.0, 0.0, 2.125 / 1.25),
    (1.0, 0.25, 0.25 * 0.625 / 0.75 + 0.75 * 2.125 / 1.25),
    # beta .1: v+ = [1.1, 1.0] -> err [1.45, .5]: mse 1.17625 / w .975, divided by beta
    (0.1, 1.0, 1.17625 / 0.975 / 0.1),
    # beta .1: v- = 1.1 v_old - .1 v_theta = [.9, 1.0] -> err [1.55, .5]:
    #          mse 1.32625 / w 1.025, / beta
    (0.1, 0.0, 1.32625 / 1.025 / 0.1),
])
def test_nft_loss_matches_hand_computed_policy_and_kl_terms(beta, r, expected_policy):
    loss, stats = rl_nft.nft_loss(V_THETA, V_OLD, V_REF, XT, X0, T, torch.tensor([r]), beta=beta,
                                  kl_weight=0.1)
    assert stats["policy"] == pytest.approx(expected_policy, rel=1e-5)
    assert stats["kl"] == pytest.approx(2.5)  # mean([2, 1]^2) = (4 + 1) / 2
    # the sources multiply the policy term by the advantage clip (5) before adding kl_weight x KL
    assert float(loss) == pytest.approx(5 * expected_policy + 0.1 * 2.5, rel=1e-5)
    unscaled, _ = rl_nft.nft_loss(V_THETA, V_OLD, V_REF, XT, X0, T, torch.tensor([r]), beta, 0.1,
                                  policy_scale=1.0)
    assert float(unscaled) == pytest.approx(expected_policy + 0.1 * 2.5, rel=1e-5)


def test_nft_loss_is_the_same_on_flux_packed_tokens():
    # (B, C, h, w) = (1, 1, 1, 2) and the same numbers as (B, L, F) = (1, 2, 1): per-sample means
    # over all axes
    packed = [t.view(1, 2, 1) for t in (V_THETA, V_OLD, V_REF, XT, X0)]
    a, sa = rl_nft.nft_loss(V_THETA, V_OLD, V_REF, XT, X0, T, torch.tensor([0.3]))
    b, sb = rl_nft.nft_loss(*packed, T, torch.tensor([0.3]))
    assert float(a) == pytest.approx(float(b)) and sa == pytest.approx(sb)


def test_nft_adaptive_weight_is_per_sample_without_gradient_and_floored():
    v = V_THETA.clone().requires_grad_(True)
    loss, _ = rl_nft.nft_loss(v, V_OLD, V_REF, XT, X0, T, torch.tensor([1.0]), beta=1.0,
                              kl_weight=0.0, policy_scale=1.0)
    loss.backward()
    # w = .75 held constant: dL/dv = -t * 2 err / (N w) = -.5 * 2 * [1, .5] / 1.5
    assert v.grad.flatten().tolist() == pytest.approx([-2 / 3, -1 / 3])
    # per sample: a second sample with 10x the error gets its own weight, so both losses are
    # comparable
    # errors [1, .5] and [10, 5]... scaled x10
    x0 = torch.cat([X0, X0 - 10 * (XT - 0.5 * V_THETA - X0)])
    _, big = rl_nft.nft_loss(torch.cat([V_THETA] * 2), torch.cat([V_OLD] * 2),
                             torch.cat([V_REF] * 2), torch.cat([XT] * 2), x0,
                             torch.tensor([0.5, 0.5]), torch.tensor([1.0, 1.0]), 1.0, 0.0)
    # sample 2: err = 11 * [1, .5]: mse 11^2 * .625 / (11 * .75) = 11 * .8333; mean with sample 1
    assert big["policy"] == pytest.approx((0.625 / 0.75) * (1 + 11) / 2, rel=1e-5)
    # floor: an error of 1e-7 is divided by 1e-5, not by 1e-7
    zero = as_latent([0, 0])  # x_t = 0 and v = 0 predict x0 = 0; the true x0 is 1e-7 away
    _, tiny = rl_nft.nft_loss(zero, zero, zero, zero, as_latent([1e-7, 1e-7]), T,
                              torch.tensor([1.0]), 1.0, 0.0)
    assert tiny["policy"] == pytest.approx(1e-14 / 1e-5, rel=1e-2)


def test_optimality_from_rewards_by_hand():
    # groups: [1, 0] and [.5, .5]; global std of [1, 0, .5, .5] = sqrt(.125)
    r = rl_nft.optimality_from_rewards([1.0, 0.0, 0.5, 0.5], [0, 0, 1, 1])
    a = 0.5 / (0.125 ** 0.5 + 1e-4)
    assert r.tolist() == pytest.approx([0.5 + 0.5 * a / 5, 0.5 - 0.5 * a / 5, 0.5, 0.5], rel=1e-6)
    # the baseline is the prompt's own group: the same reward is good in one group, bad in another
    r = rl_nft.optimality_from_rewards([0.6, 0.2, 0.6, 1.0], [0, 0, 1, 1])
    assert r[0] > 0.5 > r[2]
    # clipping: A = .5 / .5001 ~ 1 is clipped to .5, then mapped to exactly 1 and 0
    clipped = rl_nft.optimality_from_rewards([1.0, 0.0], [0, 0], adv_clip=0.5)
    assert clipped.tolist() == pytest.approx([1.0, 0.0])
    # a group of equal rewards: r = 0.5 for each (even when every reward in the batch is equal)
    assert rl_nft.optimality_from_rewards([0.3, 0.3], [0, 0]).tolist() == [0.5, 0.5]
    assert rl_nft.old_policy_decay(100) == pytest.approx(0.1)
    assert rl_nft.old_policy_decay(10_000) == 0.5


def test_official_mask_uses_the_global_std_and_the_group_mean():
    # group 0 = [1, .9, .95, .85]: own std .0559 > .05 but mean .925 > .9.
    # A rule on the group's own std (std < .05 and mean > .9) keeps it;
    # the official rule (global std > .05 and group mean < .9) masks it
    rewards = [1.0, 0.9, 0.95, 0.85, 0.2, 0.6, 0.4, 0.8]
    groups = [0] * 4 + [1] * 4
    keep = rl_nft.train_mask(rewards, groups, "official")
    assert keep.tolist() == [False] * 4 + [True] * 4
    assert rl_nft.train_mask(rewards, groups, "none").all()          # DiffusionNFT masks nothing
    # the ban is the group's own rule: group 0's std .0559 is above .05, so it is not banned ...
    assert rl_nft.groups_to_ban(rewards, groups) == []
    # ... while a flat, high group is
    assert rl_nft.groups_to_ban([0.95, 0.95, 0.93, 0.95, 0.1, 0.5], [0, 0, 0, 0, 1, 1]) == [0]
    # a batch whose rewards barely vary at all (global std + 1e-4 <= .05) trains on nothing
    assert not rl_nft.train_mask([0.5, 0.5, 0.52, 0.5], [0, 0, 1, 1], "official").any()


def test_training_timesteps_drop_a_random_one_per_sample():
    gen = torch.Generator().manual_seed(0)
    idx = rl_nft.training_timesteps(300, 10, gen)
    assert idx.shape == (300, 9)                                   # int(0.99 * 10) = 9 of 10
    assert all(len(set(row.tolist())) == 9 for row in idx)  # a permutation prefix: no repeats
    dropped = [({*range(10)} - set(row.tolist())).pop() for row in idx]
    assert len(set(dropped)) == 10  # every timestep is sometimes the one left out
    # each sample has its own order (~246 expected)
    assert len({tuple(row[:3].tolist()) for row in idx}) > 200


def test_accumulation_groups_and_ema_decay():
    assert rl_nft.accumulation_groups(4, 1) == [[0, 1, 2, 3]]
    assert rl_nft.accumulation_groups(5, 2) == [[0, 1], [2, 3, 4]]
    assert rl_nft.ema_decay(1) == pytest.approx(2 / 11) and rl_nft.ema_decay(1000) == 0.9


# ---- the sampler: an ODE with a known exact solution ----
# data ~ N(MU, S^2), noise ~ N(0, 1): the flow x_t = (1-t) MU + sqrt((1-t)^2 S^2 + t^2) z is exact
MU, S = 0.7, 0.3


def gaussian_flow(x, t):
    std = ((1 - t) ** 2 * S ** 2 + t ** 2) ** 0.5
    dstd = (-(1 - t) * S ** 2 + t) / std
    return -MU + dstd / std * (x - (1 - t) * MU)


def exact(z, t):
    return (1 - t) * MU + ((1 - t) ** 2 * S ** 2 + t ** 2) ** 0.5 * z


def test_second_order_solver_converges_twice_as_fast_as_euler():
    z = torch.tensor([-1.5, 0.3, 2.0], dtype=torch.float64)
    errors = {}
    for solver in ("euler", "dpm2"):
        errors[solver] = []
        for n in (32, 64, 128):
            sig = torch.linspace(0.9, 0.1, n + 1, dtype=torch.float64)
            x = rl_nft.solve_flow_ode(lambda x, i: gaussian_flow(x, sig[i]), exact(z, 0.9), sig,
                                      solver)
            errors[solver].append(float((x - exact(z, 0.1)).abs().max()))
    euler, dpm2 = errors["euler"], errors["dpm2"]
    # doubling the steps: Euler's error halves (first order), the multistep solver's quarters
    # (second order)
    assert [euler[i] / euler[i + 1] for i in range(2)] == pytest.approx([2, 2], rel=0.1)
    assert [dpm2[i] / dpm2[i + 1] for i in range(2)] == pytest.approx([4, 4], rel=0.12)
    assert dpm2[1] < euler[1] / 10
    # from t = 1 the first two steps are first order (lambda(1) = -inf), so with two steps the
    # solvers agree
    sig = torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64)
    a, b = (rl_nft.solve_flow_ode(lambda x, i: gaussian_flow(x, sig[i]), z, sig, s)
            for s in ("euler", "dpm2"))
    assert torch.allclose(a, b)


# ---- the two policies on a tiny SD3 ----
@pytest.fixture
def tiny_policy():
    torch.manual_seed(0)
    args = rl_nft.Args(generator="tiny-random", resolution=64, lora_r=8, lora_alpha=16,
                       sample_steps=4, grad_clip=1e9)
    pipe = common.load_generator("tiny-random")
    geo = rl_nft.latent_geometry(pipe, 64, 1.0)
    conds = rl_nft.encode_conditions(pipe, [{"key": "a", "prompt": "a red square", "source": None}],
                                     geo)
    params = rl_nft.add_policies(pipe.transformer, args)
    return args, pipe, geo, conds, params


def test_lora_targets_skip_sd35_second_attention():
    """SD3.5-Medium's dual-attention blocks have `attn2`; the sources' `attn.`-prefixed names must
    not reach it."""
    from diffusers import SD3Transformer2DModel
    tr = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, out_channels=4,
                               num_layers=2, attention_head_dim=16, num_attention_heads=4,
                               joint_attention_dim=64, caption_projection_dim=64,
                               pooled_projection_dim=64, pos_embed_max_size=16,
                               dual_attention_layers=(0, 1))
    assert any(".attn2." in n for n, _ in tr.named_modules())
    rl_nft.add_policies(tr, rl_nft.Args(lora_r=4, lora_alpha=8))
    adapted = {n.rsplit(".lora_", 1)[0] for n, _ in tr.named_parameters() if ".lora_A.default" in n}
    assert adapted and not any(".attn2." in n for n in adapted)
    # 2 blocks x (q, k, v, out, add q/k/v) + the first block's context output
    # (the last block has none)
    assert len(adapted) == 2 * 7 + 1


def test_soft_update_is_the_convex_combination(tiny_policy):
    args, pipe, *_ = tiny_policy
    tr = pipe.transformer
    theta, old = rl_nft.adapter_params(tr, "default"), rl_nft.adapter_params(tr, "old")
    assert set(theta) == set(old) and theta
    assert all(torch.equal(theta[k], old[k]) for k in theta)  # old = theta at the start
    with torch.no_grad():
        for p in list(theta.values()) + list(old.values()):
            p.copy_(torch.randn_like(p))
    before = {k: (theta[k].clone(), old[k].clone()) for k in theta}
    rl_nft.soft_update(tr, 0.3)
    for k, (th, ol) in before.items():
        assert torch.allclose(old[k], 0.3 * ol + 0.7 * th, atol=1e-6)
        assert torch.equal(theta[k], th)  # theta itself does not move


def test_ema_follows_theta_and_swaps_in_for_evaluation(tiny_policy):
    args, pipe, *_ = tiny_policy
    tr = pipe.transformer
    theta = rl_nft.adapter_params(tr, "default")
    ema = {k: p.detach().clone() for k, p in theta.items()}
    start = {k: p.detach().clone() for k, p in theta.items()}
    with torch.no_grad():
        for p in theta.values():
            p.add_(1.0)
    rl_nft.ema_update(ema, tr, step=1, max_decay=0.9)  # decay 2/11: ema = 2/11 start + 9/11 theta
    k = next(iter(ema))
    assert torch.allclose(ema[k], start[k] + 9 / 11, atol=1e-6)
    with rl_nft.ema_weights(tr, ema):
        assert torch.equal(theta[k], ema[k])
    assert torch.allclose(theta[k], start[k] + 1.0)          # restored afterwards


def test_policies_route_forward_passes(tiny_policy):
    args, pipe, geo, conds, _ = tiny_policy
    tr = pipe.transformer
    with torch.no_grad():
        for p in rl_nft.adapter_params(tr, "default").values():
            p.add_(0.2 * torch.randn_like(p))
    x, t = torch.randn(1, 4, 32, 32), torch.tensor([0.6])
    out = {}
    for name in ("default", "old", None):
        rl_nft.use_policy(tr, name)
        with torch.no_grad():
            out[name] = rl_nft.velocity(tr, x, t, conds["a"], geo)
    assert torch.equal(out["old"], out[None])         # old is still the (no-op) initial LoRA
    assert not torch.allclose(out["default"], out[None])
    rl_nft.use_policy(tr, "old")
    assert not any(p.requires_grad for n, p in tr.named_parameters() if ".old." in n)


@pytest.mark.parametrize("task", ["t2i", "edit"])
def test_fused_old_and_reference_pass_equals_two_passes(task):
    torch.manual_seed(0)
    pipe = common.load_generator("tiny-random", task)
    geo = rl_nft.latent_geometry(pipe, 64, 2.5)
    src = Image.new("RGB", (64, 64), (200, 40, 40)) if task == "edit" else None
    conds = rl_nft.encode_conditions(pipe, [{"key": "a", "prompt": "a red square", "source": src}],
                                     geo)
    tr = pipe.transformer
    rl_nft.add_policies(tr, rl_nft.Args(lora_r=4, lora_alpha=8))
    with torch.no_grad():
        for p in rl_nft.adapter_params(tr, "old").values():
            p.add_(0.3 * torch.randn_like(p))  # old != base, so the two halves must differ
    cond = rl_nft.collate(conds, ["a", "a"], "cpu", torch.float32)
    x = rl_nft.initial_noise([1, 2], geo)
    t = torch.tensor([0.4, 0.8])
    v_old, v_ref = rl_nft.old_and_ref_velocities(tr, x, t, cond, geo)
    with torch.no_grad():
        rl_nft.use_policy(tr, "old")
        old = rl_nft.velocity(tr, x, t, cond, geo)
        rl_nft.use_policy(tr, None)
        ref = rl_nft.velocity(tr, x, t, cond, geo)
    # equal up to float32 rounding (a batch of 2B sums in another order than a batch of B)
    assert torch.allclose(v_old, old, atol=2e-4) and torch.allclose(v_ref, ref, atol=2e-4)
    assert not torch.allclose(old, ref, atol=1e-3)
    assert not any(h for m in tr.modules() for h in m._forward_hooks.values())   # hooks removed


def test_one_optimiser_step_per_epoch_and_masked_samples_skipped(tiny_policy, monkeypatch):
    """8 samples in mini-batches of 2: the gradient of the whole epoch makes ONE optimiser step;
    masked samples are never put through the loss, and an all-masked epoch still steps (weight decay
    only)."""
    args, pipe, geo, conds, params = tiny_policy
    tr = pipe.transformer
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.5)
    steps = []
    real_step = opt.step
    monkeypatch.setattr(opt, "step", lambda *a, **k: (steps.append(1), real_step(*a, **k)))
    seen = []
    real_loss = rl_nft.nft_loss
    def recording_loss(*a, **k):
        seen.append(len(a[4]))
        return real_loss(*a, **k)

    monkeypatch.setattr(rl_nft, "nft_loss", recording_loss)
    x0 = torch.randn(8, 4, 32, 32)
    cond = rl_nft.collate(conds, ["a"] * 8, "cpu", torch.float32)
    sigmas = rl_nft.sampler_sigmas(pipe, 4, geo)
    keep = torch.tensor([True, False, True, True, False, False, True, True])
    r = torch.full((8,), 0.7)
    gen = torch.Generator().manual_seed(0)
    step, totals = optimise(dict(transformer=tr, optimizer=opt, params=params, sigmas=sigmas, geo=geo, args=args),
                            x0, cond, r, keep, gen, 0)
    assert step == 1 and len(steps) == 1 and totals["loss"] > 0
    assert sum(seen) == 5 * 3            # 5 kept samples x int(.99 * 4) = 3 timesteps each
    # two steps per epoch when asked
    args.gradient_steps_per_epoch = 2
    step, _ = optimise(dict(transformer=tr, optimizer=opt, params=params, sigmas=sigmas, geo=geo, args=args),
                       x0, cond, r, keep, gen, step)
    assert step == 3 and len(steps) == 3
    # all masked: zero gradients, yet the step happens; with fresh moments it is the decoupled
    # weight decay alone
    fresh = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.5)
    before = [p.detach().clone() for p in params]
    args.gradient_steps_per_epoch = 1
    step, totals = optimise(dict(transformer=tr, optimizer=fresh, params=params, sigmas=sigmas, geo=geo, args=args),
                            x0, cond, r, torch.zeros(8, dtype=torch.bool), gen, step)
    assert step == 4 and totals is None
    assert all(torch.allclose(p, b * (1 - 1e-2 * 0.5)) for p, b in zip(params, before))


@pytest.mark.parametrize("prefer_good", [True, False])
def test_nft_updates_move_samples_toward_the_preferred_target(tiny_policy, prefer_good):
    """Learning signal, measured: two fixed targets, a scripted reward prefers one; samples from
    fixed seeds must move toward that one, and away from it when the reward is flipped."""
    args, pipe, geo, conds, params = tiny_policy
    tr = pipe.transformer
    g = torch.Generator().manual_seed(0)
    good, bad = torch.randn(4, 32, 32, generator=g), torch.randn(4, 32, 32, generator=g)
    x0 = torch.stack([good, bad])                                                  # (2, C, h, w)
    rewards = [1.0, 0.0] if prefer_good else [0.0, 1.0]
    r = rl_nft.optimality_from_rewards(rewards, [0, 0], adv_clip=0.5)               # r in {0, 1}
    cond = rl_nft.collate(conds, ["a", "a"], "cpu", torch.float32)
    opt = torch.optim.AdamW(params, lr=1e-2)
    sigmas = rl_nft.sampler_sigmas(pipe, args.sample_steps, geo)
    keep = torch.ones(2, dtype=torch.bool)

    def gap():  # how much closer a fresh sample is to `good` than to `bad`
        s = rl_nft.sample_latents(pipe, cond, [11, 12], sigmas, geo, "default", "dpm2")
        return float(((s - bad) ** 2).mean() - ((s - good) ** 2).mean())
    before = gap()
    step = 0
    for _ in range(40):
        step, _ = optimise(dict(transformer=tr, optimizer=opt, params=params, sigmas=sigmas, geo=geo, args=args),
                           x0, cond, r, keep, g, step)
    moved = gap() - before
    assert (moved > 0.01) if prefer_good else (moved < -0.01), moved


# ---- the reward path with scripted critiques ----
class ScriptedBackend:
    """A scorer backend whose critiques are fixed texts, in turn."""
    batch_size = 8

    def __init__(self, texts):
        self.texts, self.i = texts, 0

    def generate(self, batch, *a, **k):
        out = [self.texts[(self.i + j) % len(self.texts)] for j in range(len(batch))]
        self.i += len(batch)
        return out


READABLE = ("Text Faithfulness:\n## Justification: ok\n## Score: 3\nPhysical and Visual Quality:\n"
            "## Justification: ok\n## Score: 2\nText Rendering:\n## Score: N/A\n")


def test_reward_images_keeps_per_dimension_scores_and_counts_unreadable():
    scorer = rr.RationalRewardsScorer(ScriptedBackend([READABLE, "I refuse to grade this."]), "t2i")
    img = Image.new("RGB", (8, 8))
    res = rl_nft.reward_images(scorer, [img] * 4, [{"prompt": "p"}] * 4)
    assert res["rewards"] == pytest.approx([(2.5 - 1) / 3, 0.0] * 2)  # unreadable -> reward 0
    assert res["unreadable"] == 2 and res["truncated"] == 0
    assert rr.dimension_means(res["scores"]) == {
        "text_faithfulness": 3.0, "physical_quality": 2.0, "text_rendering": None
    }
    scorer.weights = {"physical_quality": 0.0}
    weighted = rl_nft.reward_images(scorer, [img] * 2, [{"prompt": "p"}] * 2)
    assert weighted["rewards"] == pytest.approx([(3 - 1) / 3, 0.0])


def brightness_judge(payload):
    """Text faithfulness follows the image's brightness (so rewards vary within a group); about one
    critique in five is unreadable, decided by the image itself so that reruns see the same."""
    raw = base64.b64decode(images_in(payload)[0].split(",", 1)[1])
    pixels = Image.open(io.BytesIO(raw)).convert("L").tobytes()
    level = sum(pixels) / len(pixels) / 255
    if sum(pixels) % 5 == 0:
        return "no idea"
    return (
        f"1. Text Faithfulness:\n## Score: {1 + 3 * level:.3f}\n2. Physical and Visual Quality:\n"
        "## Score: 3\n3. Text Rendering:\n## Score: N/A\n")


def rows_of(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def nft_main(server, out, *extra):
    """rl_nft.main in-process (the CLI's subprocess path runs in tests/test_chain.py)."""
    return rl_nft.main(["--generator", "tiny-random", "--scorer", "served", "--scorer-api-base",
                        server.url, "--out", str(out), "--prompts-per-epoch", "2", "--group-size",
                        "3", "--sample-steps", "4", "--eval-steps", "40", "--lr", "3e-3",
                        "--eval-every", "2", "--num-eval-prompts", "2", *map(str, extra)])


def test_reward_path_resume_and_lora_files(tmp_path, scripted_server, capsys):
    server = scripted_server(brightness_judge)
    out, whole = tmp_path / "cut", tmp_path / "whole"
    assert nft_main(server, out, "--epochs", "2") == 0
    rows = rows_of(out / "metrics.csv")
    assert [r["epoch"] for r in rows] == ["1", "2"]
    # per-dimension scores reach metrics.csv; physical quality is always 3, text rendering
    # always N/A
    assert all(float(r["physical_quality"]) == 3.0 and r["text_rendering"] == "" for r in rows)
    assert all(1.0 <= float(r["text_faithfulness"]) <= 4.0 for r in rows)
    assert rows[1]["eval_reward"] != "" and rows[0]["eval_reward"] == ""
    # 12 samples in mini-batches of 2: one optimiser step per epoch, and eta follows the step count
    assert [int(r["step"]) for r in rows] == [1, 2]
    assert [float(r["eta"]) for r in rows] == pytest.approx([0.001, 0.002])
    # t2i masks nothing
    assert all(r["masked_samples"] == "0" and r["trained_samples"] == "6" for r in rows)
    saved = json.loads((out / "args.json").read_text())
    assert (saved["sample_steps"], saved["eval_steps"], saved["mask"]) == (4, 40, "none")
    captured = capsys.readouterr()
    # one line per epoch, and the bar
    assert "epoch 2: R=" in captured.out and "epochs" in captured.err
    # a second run into the same --out without --resume is refused
    with pytest.raises(SystemExit, match="--resume"):
        nft_main(server, out, "--epochs", "3")
    # as if killed while writing the next checkpoint: a torn temp file and a stray metrics row
    (out / "checkpoint.pt.tmp").write_bytes(b"torn")
    with open(out / "metrics.csv", "a") as f:
        f.write("3,99,0.5,,,,,,,,,,,,,\n")
    assert nft_main(server, out, "--epochs", "3", "--resume") == 0
    assert "resuming after epoch 2" in capsys.readouterr().err
    rows = rows_of(out / "metrics.csv")
    assert [r["epoch"] for r in rows] == ["1", "2", "3"] and rows[2]["step"] != "99"
    # resumed = uninterrupted: the same steps, rewards and weights (every draw is seeded by epoch)
    assert nft_main(server, whole, "--epochs", "3") == 0
    ref = rows_of(whole / "metrics.csv")
    def without_time(row):
        return {k: v for k, v in row.items() if k != "seconds"}

    for a, b in zip(rows, ref):
        assert without_time(a) == without_time(b)
    from safetensors.torch import load_file
    wa = torch.load(out / "checkpoint.pt")["theta"]
    wb = torch.load(whole / "checkpoint.pt")["theta"]
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)
    # the saved LoRA is the EMA of theta, not theta
    ema = torch.load(out / "checkpoint.pt")["ema"]
    lora = load_file(out / "lora" / "epoch_0003" / "pytorch_lora_weights.safetensors")
    key = next(k for k in ema if "lora_A" in k)
    match = [v for k, v in lora.items() if k.endswith(key.replace(".weight", "") + ".weight")]
    assert len(match) == 1
    assert torch.equal(match[0], ema[key])
    assert not torch.equal(ema[key], wa[key])
    for name in ("args.json", "reward_curve.png", "eval/epoch_0000.png", "eval/epoch_0002.png",
                 "eval/epoch_0003.png"):
        assert (out / name).is_file(), name
    assert json.loads((out / "args.json").read_text())["group_size"] == 3
    # the LoRA loads with diffusers' own load_lora_weights and changes the output
    pipe = common.load_generator("tiny-random")
    gen = lambda: pipe("a red square", num_inference_steps=4, guidance_scale=1.0, height=64,
                       width=64,
                       generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    base = gen()
    pipe.load_lora_weights(str(out / "lora" / "epoch_0003"))
    assert abs(gen() - base).max() > 1e-4
    # resuming with other settings is refused, naming the difference
    with pytest.raises(ValueError, match="--lora-r"):
        nft_main(server, out, "--epochs", "4", "--resume", "--lora-r", "8")
    with pytest.raises(ValueError, match="--t5"):
        nft_main(server, out, "--epochs", "4", "--resume", "--no-t5")
    # issue 33.3: a new --lr (or --beta, ...) on resume is said and really used: the optimiser
    # the checkpoint restores trains at it
    capsys.readouterr()
    assert nft_main(server, out, "--epochs", "4", "--resume", "--lr", "1e-2", "--beta", "0.5") == 0
    err = capsys.readouterr().err
    assert "--lr: 0.003 then, 0.01 now: continuing with the new value" in err
    assert "--beta: 1.0 then, 0.5 now" in err
    assert torch.load(out / "checkpoint.pt")["optimizer"]["param_groups"][0]["lr"] == 0.01


def test_bad_arguments_are_clear(tmp_path):
    cases = ((["--epochs", "0"], SystemExit, "--epochs must be a positive"),
             (["--group-size", "1"], SystemExit, "--group-size must be at least 2"),
             (["--adv-clip", "0"], SystemExit, "--adv-clip must be > 0"),
             (["--beta", "0"], SystemExit, "--beta must be > 0"),
             (["--lr", "nan"], SystemExit, "--lr must be > 0"),
             (["--gradient-steps-per-epoch", "9"], SystemExit, "more than the epoch's 8"),
             (["--reward-weights", "text_faithfulness=-1"], ValueError, "finite numbers >= 0"),
             (["--prompts", tmp_path / "none.txt"], FileNotFoundError, "prompt file"),
             (["--generator", "someone/not-downloaded"], common.ModelLoadError, "hf download"))
    for argv, error, message in cases:
        with pytest.raises(error, match=message):
            rl_nft.main(["--scorer", "tiny-random", "--out", str(tmp_path / "o"), *map(str, argv)])


def edit_judge(payload):
    """Editing critiques: the source comes first, the edited image second; text faithfulness is a
    hash of the edited image's pixels (the tiny model's edits barely differ, and the official mask
    needs rewards that vary), image faithfulness is always 2 (logged, but not in the default
    reward)."""
    urls = images_in(payload)
    assert len(urls) == 2
    raw = base64.b64decode(urls[1].split(",", 1)[1])
    pixels = Image.open(io.BytesIO(raw)).convert("L").tobytes()
    level = (sum(pixels) % 97) / 96
    return (
        f"1. Text Faithfulness:\n## Score: {1 + 3 * level:.3f}\n2. Image Faithfulness:\n"
        "## Score: 2\n3. Physical and Visual Quality:\n## Score: 3\n4. Text Rendering:\n"
        "## Score: N/A\n")


def test_edit_rl_on_tiny_kontext(tmp_path, scripted_server, capsys):
    """--task edit: tiny FLUX.1-Kontext, source images from prompts/rl_edits.jsonl, four dimensions
    logged, the official reward (image faithfulness left out), the official mask and bans, resume,
    LoRA files."""
    server = scripted_server(edit_judge)
    out = tmp_path / "edit"
    argv = ["--task", "edit", "--generator", "tiny-random", "--scorer", "served",
            "--scorer-api-base", server.url, "--out", str(out), "--prompts-per-epoch", "2",
            "--group-size", "2", "--sample-steps", "3", "--eval-steps", "3", "--eval-every", "2",
            "--num-eval-prompts", "2"]
    assert rl_nft.main(argv + ["--epochs", "2"]) == 0
    saved = json.loads((out / "args.json").read_text())
    assert (saved["mask"], saved["reward_weights"], saved["guidance_scale"], saved["lr"]) == \
        ("official", "image_faithfulness=0", 2.5, 2e-4)
    rows = rows_of(out / "metrics.csv")
    assert all(float(r["image_faithfulness"]) == 2.0 for r in rows)
    assert all(float(r["physical_quality"]) == 3.0 for r in rows)
    for r in rows:  # R = mean(tf, pq) mapped to [0, 1]: linear, so it holds for the epoch means too
        assert float(r["reward_mean"]) == pytest.approx(
            ((float(r["text_faithfulness"]) + 3) / 2 - 1) / 3, abs=1e-6)
        assert int(r["masked_samples"]) + int(r["trained_samples"]) == 4
    assert any(int(r["trained_samples"]) > 0 for r in rows)
    # every request carried the source image first (checked in edit_judge) and the edit instruction
    assert any("make the house blue" in text_in(r["payload"]) or "apple" in text_in(r["payload"])
               for r in server.requests)
    assert rl_nft.main(argv + ["--epochs", "3", "--resume"]) == 0
    assert [r["epoch"] for r in rows_of(out / "metrics.csv")] == ["1", "2", "3"]
    grid = Image.open(out / "eval" / "epoch_0003.png")
    # two eval prompts, each source | edited (256 px and a 6 px gap), title and captions
    assert grid.size == (2 * 2 * 262, 24 + 256 + 120)
    # the LoRA loads into the Kontext pipeline with diffusers' own loader and changes the edit
    pipe = common.load_generator("tiny-random", "edit")
    src = Image.open(common.PROMPTS_DIR / "rl_edit_images" / "house.png").convert("RGB")
    gen = lambda: pipe(
        image=src, prompt="make the house blue", num_inference_steps=3, guidance_scale
        =2.5, height=64, width=64, max_area=64 * 64, _auto_resize=False, generator=torch.Generator(
        ).manual_seed(0), output_type="np").images[0]
    base = gen()
    pipe.load_lora_weights(str(out / "lora" / "epoch_0003"))
    assert abs(gen() - base).max() > 1e-5


def test_edit_needs_source_images(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "make it red"}\n')
    with pytest.raises(ValueError, match="no source_image"):
        rl_nft.main(["--task", "edit", "--prompts", str(prompts), "--generator", "tiny-random",
                     "--scorer", "tiny-random", "--out", str(tmp_path / "o")])
    prompts.write_text('{"prompt": "make it red", "source_image": "gone.png"}\n')
    with pytest.raises(ValueError, match="gone.png is missing"):
        rl_nft.main(["--task", "edit", "--prompts", str(prompts), "--generator", "tiny-random",
                     "--scorer", "tiny-random", "--out", str(tmp_path / "o")])


def test_a_non_finite_loss_stops_the_run_with_the_checkpoint_intact(tiny_policy):
    args, pipe, geo, conds, params = tiny_policy
    opt = torch.optim.AdamW(params, lr=1e-3)
    x0 = torch.full((2, 4, 32, 32), float("nan"))
    cond = rl_nft.collate(conds, ["a", "a"], "cpu", torch.float32)
    with pytest.raises(FloatingPointError, match="last checkpoint is intact"):
        optimise(dict(transformer=pipe.transformer, optimizer=opt, params=params, sigmas=rl_nft.sampler_sigmas(pipe, 4, geo),
                 geo=geo, args=args), x0, cond, torch.full((2, ), 0.7), torch.ones(2, dtype=torch.bool), torch.Generator().manual_seed(0), 0)
    # a finite loss whose gradient is not: stopped before the optimiser steps on it
    before = [p.detach().clone() for p in params]
    hook = params[0].register_hook(lambda g: g * float("inf"))
    with pytest.raises(FloatingPointError, match="NFT gradient norm became (inf|nan)"):
        optimise(dict(transformer=pipe.transformer, optimizer=opt, params=params, sigmas=rl_nft.sampler_sigmas(pipe, 4, geo),
                 geo=geo, args=args), torch.randn(2, 4, 32, 32), cond, torch.full((2, ), 0.7), torch.ones(2, dtype=torch.bool), torch.Generator().manual_seed(0), 0)
    hook.remove()
    assert all(torch.equal(a, p) for a, p in zip(before, params))


def test_any_trace_of_a_run_is_an_existing_run(tmp_path):
    """Killed while writing its first checkpoint: only checkpoint.pt.tmp is left. Starting again
    without --resume must be refused (never started over); with other settings the refusal says
    what to do, never --resume; errors are one `error:` line, exit 2."""
    from conftest import run_cli
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pt.tmp").write_bytes(b"torn")
    base = ["rl_nft.py", "--generator", "tiny-random", "--scorer", "tiny-random", "--out", out]
    args = rl_nft.resolve_defaults(
        rl_nft.Args(generator="tiny-random", scorer="tiny-random", out=str(out)))
    _, digest = rl_nft.read_items(args.prompts, "t2i", 64)
    args.resume = True  # resuming it is fine; its digest is what the killed run wrote
    rl_nft.check_out_dir(out, args, digest)
    import dataclasses  # args.json as the run that was killed wrote it
    (out / "args.json").write_text(json.dumps({**dataclasses.asdict(args), "prompts_sha1": digest}))
    rl_nft.check_out_dir(out, args, digest)  # the same prompts: accepted
    res = run_cli(*base)
    assert res.returncode == 2 and res.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "already holds a run with these settings: pass --resume" in res.stderr
    res = run_cli(*base, "--lora-r", "8")
    assert res.returncode == 2
    assert "--lora-r" in res.stderr
    assert "Use another --out, or delete" in res.stderr
    assert "pass --resume" not in res.stderr
    assert (out / "checkpoint.pt.tmp").is_file()          # nothing was deleted
    (tmp_path / "file").write_text("x")
    res = run_cli("rl_nft.py", "--generator", "tiny-random", "--scorer", "tiny-random", "--out",
                  tmp_path / "file")
    assert res.returncode == 2 and "is a file, not a directory" in res.stderr


# ---- pinned against the sources (issue 22): timestep, eta, defaults, timesteps, mask ----
def test_the_timestep_reaches_a_bf16_transformer_in_float32(tiny_policy, monkeypatch):
    """In bf16 SD3's t x 1000 would land on multiples of 4 (0.9133 -> 916); the sources pass the
    float32 value, both when sampling and when training."""
    args, pipe, geo, conds, params = tiny_policy
    tr = pipe.transformer.to(torch.bfloat16)
    seen = []
    hook = tr.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["timestep"].clone()), with_kwargs=True)
    try:
        cond = rl_nft.collate(conds, ["a"] * 2, "cpu", torch.float32)
        sigmas = torch.tensor([0.9133, 0.5, 0.0])
        rl_nft.sample_latents(pipe, cond, [0, 1], sigmas, geo, "old", "euler")
        assert seen and all(t.dtype == torch.float32 for t in seen)
        assert seen[0][0].item() == pytest.approx(913.3, abs=1e-3)
        seen.clear()
        opt = torch.optim.AdamW(params, lr=0.0)
        optimise(dict(transformer=tr, optimizer=opt, params=params, sigmas=sigmas, geo=geo, args=args),
                 torch.randn(2, 4, 32, 32), cond, torch.full((2,), 0.5), torch.ones(2, dtype=torch.bool), torch.Generator().manual_seed(0), 0)
        assert seen and all(t.dtype == torch.float32 for t in seen)
        assert {round(float(t[0]), 3) for t in seen} <= {913.3, 500.0}
    finally:
        hook.remove()
        tr.to(torch.float32)


def test_eta_follows_optimiser_steps_and_eval_uses_euler(tmp_path, scripted_server, monkeypatch):
    """Two optimiser steps per epoch: eta = min(0.001 global_step, 0.5) moves by 0.002 an epoch.
    Collection uses the dpm2 solver at --sample-steps, the eval grid Euler at --eval-steps."""
    calls = []
    real = rl_nft.sample_latents

    def spy(pipe, cond, seeds, sigmas, geo, policy, solver, *a):
        calls.append((policy, solver, len(sigmas) - 1))
        return real(pipe, cond, seeds, sigmas, geo, policy, solver, *a)
    monkeypatch.setattr(rl_nft, "sample_latents", spy)
    server = scripted_server(brightness_judge)
    out = tmp_path / "run"
    assert rl_nft.main(["--generator", "tiny-random", "--scorer", "served", "--scorer-api-base",
                        server.url, "--out", str(out), "--prompts-per-epoch", "2",
                        "--group-size", "2", "--sample-steps", "3", "--eval-steps", "5",
                        "--num-eval-prompts", "1", "--epochs", "2",
                        "--gradient-steps-per-epoch", "2"]) == 0
    rows = rows_of(out / "metrics.csv")
    assert [int(r["step"]) for r in rows] == [2, 4]
    assert [float(r["eta"]) for r in rows] == pytest.approx([0.002, 0.004])
    assert {c for c in calls if c[0] == "old"} == {("old", "dpm2", 3)}
    assert {c for c in calls if c[0] == "default"} == {("default", "euler", 5)}


@pytest.mark.parametrize("task,sample_steps,eval_steps", [("t2i", 10, 40), ("edit", 15, 20)])
def test_step_defaults_per_task(task, sample_steps, eval_steps):
    """DiffusionNFT config/nft.py (SD3: 10 sampling, 40 eval steps); the official
    flux_kontext_nft.py (15 and 20)."""
    args = rl_nft.resolve_defaults(rl_nft.Args(task=task))
    assert (args.sample_steps, args.eval_steps) == (sample_steps, eval_steps)


def test_optimise_epoch_drops_a_random_timestep_per_sample_and_averages_over_kept(
        tiny_policy, monkeypatch):
    """Inside optimise_epoch each sample trains on int(0.99 S) of the S timesteps, the one left out
    drawn per sample; the loss of a mini-batch is the mean over its kept samples only (the official
    mean_by_mask: sum(l * mask) / sum(mask)), not over the whole mini-batch."""
    args, pipe, geo, conds, params = tiny_policy
    N = 12
    x0 = torch.arange(N, dtype=torch.float32).view(N, 1, 1, 1).expand(N, 4, 32, 32).contiguous()
    keep = torch.tensor([True, False] * (N // 2))
    sigmas = rl_nft.sampler_sigmas(pipe, 4, geo)
    seen_t, checked = {}, []
    real = rl_nft.nft_loss

    def spy(v_theta, v_old, v_ref, x_t, xb, t, r, *a, **k):
        loss, stats = real(v_theta, v_old, v_ref, x_t, xb, t, r, *a, **k)
        for row in range(len(xb)):
            seen_t.setdefault(int(xb[row, 0, 0, 0]), []).append(float(t[row]))
        each = [real(v_theta[i:i + 1], v_old[i:i + 1], v_ref[i:i + 1], x_t[i:i + 1],
                     xb[i:i + 1], t[i:i + 1], r[i:i + 1], *a, **k)[0] for i in range(len(xb))]
        checked.append((float(loss.detach()), sum(float(e.detach()) for e in each) / len(each)))
        return loss, stats
    monkeypatch.setattr(rl_nft, "nft_loss", spy)
    backward, real_backward = [], torch.Tensor.backward
    monkeypatch.setattr(torch.Tensor, "backward",
                        lambda self, *a, **k: (backward.append(float(self.detach())),
                                               real_backward(self, *a, **k)))
    opt = torch.optim.AdamW(params, lr=0.0)
    cond = rl_nft.collate(conds, ["a"] * N, "cpu", torch.float32)
    args.train_batch_size = 4
    optimise(dict(transformer=pipe.transformer, optimizer=opt, params=params, sigmas=sigmas, geo=geo, args=args),
             x0, cond, torch.full((N,), 0.7), keep, torch.Generator().manual_seed(1), 0)
    assert sorted(seen_t) == [i for i in range(N) if i % 2 == 0]  # masked samples never trained
    dropped = set()
    for i, ts in seen_t.items():
        assert len(ts) == 3 and len(set(ts)) == 3  # 3 of the 4 sampler timesteps, each once
        dropped |= set(sigmas[:4].tolist()) - set(ts)
    assert len(dropped) > 1  # not always the same timestep
    # two kept samples in each mini-batch of four: the batch loss is their mean
    assert checked and all(loss == pytest.approx(mean, rel=1e-5) for loss, mean in checked)
    # what is backpropagated: that mean over (3 mini-batches x 3 timesteps), whatever the mask
    assert backward == pytest.approx([loss / 9 for loss, _ in checked], rel=1e-6)


def test_kontext_source_tokens_get_position_id_one():
    pipe = common.load_generator("tiny-random", "edit")
    geo = rl_nft.latent_geometry(pipe, 64, 2.5)
    L = (geo.h // 2) * (geo.w // 2)
    ids = geo.img_ids
    assert ids.shape == (2 * L, 3)
    assert (ids[:L, 0] == 0).all() and (ids[L:, 0] == 1).all()  # target 0, source image 1
    assert torch.equal(ids[:L, 1:], ids[L:, 1:])                   # same rows and columns


@pytest.mark.parametrize("which,modules,millions", [("sd35", 191, 18.8), ("kontext", 266, 52.3)])
def test_lora_counts_per_policy_on_the_real_configs(which, modules, millions):
    """On meta weights (no memory, no download): the README's LoRA sizes per policy."""
    import sys
    sys.path.insert(0, str(common.HERE / "benchmarks"))
    import bench_nft
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
    cls, config = ((SD3Transformer2DModel, bench_nft.SD35_MEDIUM) if which == "sd35"
                   else (FluxTransformer2DModel, bench_nft.KONTEXT_DEV))
    with torch.device("meta"):
        tr = cls(**config)
        params = rl_nft.add_policies(tr, rl_nft.Args())
    adapted = {n.rsplit(".lora_", 1)[0] for n, _ in tr.named_parameters()
               if ".lora_A.default" in n}
    assert len(adapted) == modules
    assert round(sum(p.numel() for p in params) / 1e6, 1) == millions
