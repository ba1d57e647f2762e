"""RL that visibly learns on a CPU: the tiny generator's colour follows its latent, a toy critic
rewards redness, and the reward rises; the opposite critic (blueness) moves the images the other
way. Marked `learning` (about a minute): `python -m pytest -q -m learning`; CI runs it."""
import csv

import pytest

import rl_nft

pytestmark = pytest.mark.learning
# the README's "watch it learn" settings, 8 epochs instead of 16
LEARN = ["--generator", "tiny-random", "--lr", "1e-1", "--beta", "0.1",
         "--gradient-steps-per-epoch", "8", "--sample-steps", "4", "--eval-steps", "4",
         "--eval-every", "100", "--epochs", "8"]


def run(tmp_path, critic):
    out = tmp_path / critic
    assert rl_nft.main([*LEARN, "--scorer", critic, "--out", str(out)]) == 0
    with open(out / "metrics.csv") as f:
        return [{k: float(v) for k, v in r.items() if v} for r in csv.DictReader(f)]


def red_minus_blue(row, sign):
    """mean R - mean B of an epoch's images (0-255), read back from the toy critic's text
    faithfulness s = 2.5 + sign * 6 (R - B) / 255 (no image here reaches the clip at 1 or 4)."""
    return sign * (row["text_faithfulness"] - 2.5) * 255 / 6


def test_the_reward_rises_and_the_opposite_critic_moves_the_images_the_other_way(tmp_path):
    red, blue = run(tmp_path, "toy-redness"), run(tmp_path, "toy-blueness")
    for rows in (red, blue):  # the last three epochs clearly above the first epoch and its spread
        last = sum(r["reward_mean"] for r in rows[-3:]) / 3
        assert last > rows[0]["reward_mean"] + 2 * rows[0]["reward_std"] + 0.03, rows
    # the same seeds start from the same images; then redness and blueness pull them apart
    assert red_minus_blue(red[0], 1) == pytest.approx(red_minus_blue(blue[0], -1), abs=1e-6)
    assert red_minus_blue(red[-1], 1) > red_minus_blue(red[0], 1) + 5
    assert red_minus_blue(blue[-1], -1) < red_minus_blue(blue[0], -1) - 5
