"""rl_nft.py: the NFT loss and optimality on hand-computed numbers, the policies on a tiny SD3,
the reward path with scripted critiques, and the CLI (smoke, resume, LoRA files)."""
import base64
import csv
import io
import json

import pytest
import torch
from PIL import Image

import rationalrewards as rr
import rl_nft
from conftest import images_in


def as_latent(values):
    return torch.tensor(values, dtype=torch.float32).view(1, 1, 1, -1)  # (B=1, C=1, h=1, w=N)


# ---- the loss, by hand ----
# x0 = [1, 2], x_t = [3, 3], t = 0.5, v_theta = [2, 1], v_old = [1, 1], v_ref = [0, 0]
X0, XT, T = as_latent([1, 2]), as_latent([3, 3]), torch.tensor([0.5])
V_THETA, V_OLD, V_REF = as_latent([2, 1]), as_latent([1, 1]), as_latent([0, 0])


@pytest.mark.parametrize("beta,r,expected_policy", [
    # beta 1: v+ = v_theta = [2, 1] -> x0+ = [2, 2.5], err [1, .5]: mse .625 / w .75 = 0.8333
    (1.0, 1.0, 0.625 / 0.75),
    # beta 1: v- = 2 v_old - v_theta = [0, 1] -> x0- = [3, 2.5], err [2, .5]: mse 2.125 / w 1.25 = 1.7
    (1.0, 0.0, 2.125 / 1.25),
    (1.0, 0.25, 0.25 * 0.625 / 0.75 + 0.75 * 2.125 / 1.25),
    # beta .1: v+ = [1.1, 1.0] -> err [1.45, .5]: mse 1.17625 / w .975, divided by beta
    (0.1, 1.0, 1.17625 / 0.975 / 0.1),
    # beta .1: v- = 1.1 v_old - .1 v_theta = [.9, 1.0] -> err [1.55, .5]: mse 1.32625 / w 1.025, / beta
    (0.1, 0.0, 1.32625 / 1.025 / 0.1),
])
def test_nft_loss_by_hand(beta, r, expected_policy):
    loss, stats = rl_nft.nft_loss(V_THETA, V_OLD, V_REF, XT, X0, T, torch.tensor([r]), beta=beta, kl_weight=0.1)
    assert stats["policy"] == pytest.approx(expected_policy, rel=1e-5)
    assert stats["kl"] == pytest.approx(2.5)  # mean([2, 1]^2) = (4 + 1) / 2
    assert float(loss) == pytest.approx(expected_policy + 0.1 * 2.5, rel=1e-5)


def test_nft_adaptive_weight_is_per_sample_without_gradient_and_floored():
    v = V_THETA.clone().requires_grad_(True)
    loss, _ = rl_nft.nft_loss(v, V_OLD, V_REF, XT, X0, T, torch.tensor([1.0]), beta=1.0, kl_weight=0.0)
    loss.backward()
    # w = .75 held constant: dL/dv = -t * 2 err / (N w) = -.5 * 2 * [1, .5] / 1.5
    assert v.grad.flatten().tolist() == pytest.approx([-2 / 3, -1 / 3])
    # per sample: a second sample with 10x the error gets its own weight, so both losses are comparable
    x0 = torch.cat([X0, X0 - 10 * (XT - 0.5 * V_THETA - X0)])   # errors [1, .5] and [10, 5]... scaled x10
    _, big = rl_nft.nft_loss(torch.cat([V_THETA] * 2), torch.cat([V_OLD] * 2), torch.cat([V_REF] * 2),
                             torch.cat([XT] * 2), x0, torch.tensor([0.5, 0.5]), torch.tensor([1.0, 1.0]), 1.0, 0.0)
    # sample 2: err = 11 * [1, .5]: mse 11^2 * .625 / (11 * .75) = 11 * .8333; mean with sample 1
    assert big["policy"] == pytest.approx((0.625 / 0.75) * (1 + 11) / 2, rel=1e-5)
    # floor: an error of 1e-7 is divided by 1e-5, not by 1e-7
    zero = as_latent([0, 0])  # x_t = 0 and v = 0 predict x0 = 0; the true x0 is 1e-7 away
    _, tiny = rl_nft.nft_loss(zero, zero, zero, zero, as_latent([1e-7, 1e-7]), T, torch.tensor([1.0]), 1.0, 0.0)
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
    assert rl_nft.optimality_from_rewards([1.0, 0.0], [0, 0], adv_clip=0.5).tolist() == pytest.approx([1.0, 0.0])
    # a group of equal rewards: r = 0.5 for each (even when every reward in the batch is equal)
    assert rl_nft.optimality_from_rewards([0.3, 0.3], [0, 0]).tolist() == [0.5, 0.5]
    keep = rl_nft.flat_group_mask([0.95, 0.95, 0.95, 0.5, 0.1, 0.1], [0, 0, 1, 1, 2, 2])
    assert keep.tolist() == [False, False, True, True, True, True]  # only flat AND high groups are masked
    assert rl_nft.old_policy_decay(100) == pytest.approx(0.1) and rl_nft.old_policy_decay(10_000) == 0.5


# ---- the two policies on a tiny SD3 ----
@pytest.fixture
def tiny_policy():
    torch.manual_seed(0)
    args = rl_nft.Args(generator="tiny-random", resolution=64, lora_r=8, lora_alpha=16, sample_steps=4)
    pipe = rr.load_generator("tiny-random")
    embeds = rl_nft.encode_prompts(pipe, ["a red square", ""])
    params = rl_nft.add_policies(pipe.transformer, args)
    return args, pipe, embeds, params


def test_soft_update_is_the_convex_combination(tiny_policy):
    args, pipe, _, _ = tiny_policy
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


def test_policies_route_forward_passes(tiny_policy):
    args, pipe, embeds, _ = tiny_policy
    tr = pipe.transformer
    with torch.no_grad():
        for p in rl_nft.adapter_params(tr, "default").values():
            p.add_(0.2 * torch.randn_like(p))
    x, t = torch.randn(1, 4, 32, 32), torch.tensor([0.6])
    e, p = embeds["a red square"]
    out = {}
    for name in ("default", "old", None):
        rl_nft.use_policy(tr, name)
        with torch.no_grad():
            out[name] = rl_nft.velocity(tr, x, t, e, p)
    assert torch.equal(out["old"], out[None])         # old is still the (no-op) initial LoRA
    assert not torch.allclose(out["default"], out[None])
    rl_nft.use_policy(tr, "old")
    assert not any(p.requires_grad for n, p in tr.named_parameters() if ".old." in n)


@pytest.mark.parametrize("prefer_good", [True, False])
def test_nft_updates_move_samples_toward_the_preferred_target(tiny_policy, prefer_good):
    """Learning signal, measured: two fixed targets, a scripted reward prefers one; samples from
    fixed seeds must move toward that one, and away from it when the reward is flipped."""
    args, pipe, embeds, params = tiny_policy
    tr = pipe.transformer
    g = torch.Generator().manual_seed(0)
    good, bad = torch.randn(4, 32, 32, generator=g), torch.randn(4, 32, 32, generator=g)
    x0 = torch.stack([good, bad])                                                  # (2, C, h, w)
    rewards = [1.0, 0.0] if prefer_good else [0.0, 1.0]
    r = rl_nft.optimality_from_rewards(rewards, [0, 0], adv_clip=0.5)               # r in {0, 1}
    e, p = embeds["a red square"]
    opt = torch.optim.AdamW(params, lr=1e-2)
    sigmas = rl_nft.sampler_sigmas(pipe, args.sample_steps)[:3]

    def gap():  # how much closer a fresh sample is to `good` than to `bad`
        s = rl_nft.sample_latents(pipe, [embeds["a red square"]] * 2, [11, 12], args, "default")
        return float(((s - bad) ** 2).mean() - ((s - good) ** 2).mean())
    before = gap()
    for _ in range(40):
        rl_nft.nft_update(tr, opt, params, x0, e.expand(2, -1, -1), p.expand(2, -1), r, sigmas, args, g)
    moved = gap() - before
    # measured on this setup: about +0.026 toward good, -0.030 toward bad
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
    res = rl_nft.reward_images(scorer, [img] * 4, ["p"] * 4, None)
    assert res["rewards"] == pytest.approx([(2.5 - 1) / 3, 0.0] * 2)  # unreadable -> reward 0
    assert res["unreadable"] == 2
    assert rl_nft.dimension_means(res["scores"]) == {"text_faithfulness": 3.0, "physical_quality": 2.0,
                                                     "text_rendering": None}
    weighted = rl_nft.reward_images(scorer, [img] * 2, ["p"] * 2, {"physical_quality": 0.0})
    assert weighted["rewards"] == pytest.approx([(3 - 1) / 3, 0.0])


def brightness_judge(payload):
    """Text faithfulness follows the image's brightness (so rewards vary within a group); about one
    critique in five is unreadable, decided by the image itself so that reruns see the same."""
    raw = base64.b64decode(images_in(payload)[0].split(",", 1)[1])
    pixels = Image.open(io.BytesIO(raw)).convert("L").tobytes()
    level = sum(pixels) / len(pixels) / 255
    if sum(pixels) % 5 == 0:
        return "no idea"
    return (f"1. Text Faithfulness:\n## Score: {1 + 3 * level:.3f}\n2. Physical and Visual Quality:\n## Score: 3\n"
            f"3. Text Rendering:\n## Score: N/A\n")


def rows_of(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def nft_main(server, out, *extra):
    """rl_nft.main in-process (the CLI's subprocess path runs in tests/test_chain.py)."""
    return rl_nft.main(["--generator", "tiny-random", "--scorer", "served", "--scorer-api-base", server.url,
                        "--out", str(out), "--prompts-per-epoch", "2", "--group-size", "3", "--sample-steps", "4",
                        "--lr", "3e-3", "--eval-every", "2", "--num-eval-prompts", "2", *map(str, extra)])


def test_reward_path_resume_and_lora_files(tmp_path, scripted_server, capsys):
    server = scripted_server(brightness_judge)
    out, whole = tmp_path / "cut", tmp_path / "whole"
    assert nft_main(server, out, "--epochs", "2") == 0
    rows = rows_of(out / "metrics.csv")
    assert [r["epoch"] for r in rows] == ["1", "2"]
    # per-dimension scores reach metrics.csv; physical quality is always 3, text rendering always N/A
    assert all(float(r["physical_quality"]) == 3.0 and r["text_rendering"] == "" for r in rows)
    assert all(1.0 <= float(r["text_faithfulness"]) <= 4.0 for r in rows)
    assert rows[1]["eval_reward"] != "" and rows[0]["eval_reward"] == ""
    captured = capsys.readouterr()
    assert "epoch 2: R=" in captured.out and "epochs" in captured.err  # one line per epoch, and the bar
    # a second run into the same --out without --resume is refused
    with pytest.raises(SystemExit, match="--resume"):
        nft_main(server, out, "--epochs", "3")
    # as if killed while writing the next checkpoint: a stray temp dir and a stray metrics row
    (out / "checkpoint.tmp").mkdir()
    with open(out / "metrics.csv", "a") as f:
        f.write("3,99,0.5,,,,,,,,,,,,,\n")
    assert nft_main(server, out, "--epochs", "3", "--resume") == 0
    assert "resuming after epoch 2" in capsys.readouterr().err
    rows = rows_of(out / "metrics.csv")
    assert [r["epoch"] for r in rows] == ["1", "2", "3"] and rows[2]["step"] != "99"
    # resumed = uninterrupted: the same steps, rewards and weights (every draw is seeded by epoch)
    assert nft_main(server, whole, "--epochs", "3") == 0
    ref = rows_of(whole / "metrics.csv")
    for a, b in zip(rows, ref):
        assert {k: v for k, v in a.items() if k != "seconds"} == {k: v for k, v in b.items() if k != "seconds"}
    from safetensors.torch import load_file
    wa, wb = load_file(out / "checkpoint" / "theta.safetensors"), load_file(whole / "checkpoint" / "theta.safetensors")
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)
    for name in ("args.json", "reward_curve.png", "eval/epoch_0000.png", "eval/epoch_0002.png", "eval/epoch_0003.png"):
        assert (out / name).is_file(), name
    assert json.loads((out / "args.json").read_text())["group_size"] == 3
    # the LoRA loads with diffusers' own load_lora_weights and changes the output
    pipe = rr.load_generator("tiny-random")
    gen = lambda: pipe("a red square", num_inference_steps=4, guidance_scale=1.0, height=64, width=64,
                       generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    base = gen()
    pipe.load_lora_weights(str(out / "lora" / "epoch_0003"))
    assert abs(gen() - base).max() > 1e-4
    # resuming with other settings is refused, naming the difference
    with pytest.raises(ValueError, match="--lora-r"):
        nft_main(server, out, "--epochs", "4", "--resume", "--lora-r", "8")


def test_bad_arguments_are_clear(tmp_path):
    for argv, error, message in ((["--epochs", "0"], SystemExit, "--epochs must be a positive"),
                                 (["--group-size", "1"], SystemExit, "--group-size must be at least 2"),
                                 (["--reward-weights", "text_faithfulness=-1"], ValueError, "finite numbers >= 0"),
                                 (["--prompts", tmp_path / "none.txt"], FileNotFoundError, "prompt file"),
                                 (["--generator", "someone/not-downloaded"], rr.ModelLoadError, "hf download")):
        with pytest.raises(error, match=message):
            rl_nft.main(["--scorer", "tiny-random", "--out", str(tmp_path / "o"), *map(str, argv)])
