"""Several processes (torchrun, gloo on CPU): N processes give the run of one with the same global
batch, only rank 0 writes, a run resumes with another process count, a rank whose mini-batches
are all masked does not hang the others, and a non-finite loss on one rank stops every rank.

Marked `multiprocess` (about a minute and a half): `python -m pytest -q -m multiprocess`; CI runs
them after the default suite."""
import csv
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

import common
import parrot
import rl_nft
from conftest import ROOT, optimise
from test_rl_nft import brightness_judge

pytestmark = pytest.mark.multiprocess
FLAGS = ["--generator", "tiny-random", "--scorer", "served", "--prompts-per-epoch", "2",
         "--group-size", "3", "--sample-steps", "4", "--eval-steps", "4", "--lr", "3e-3",
         "--eval-every", "2", "--num-eval-prompts", "2"]


def rows_of(out):
    with open(out / "metrics.csv") as f:
        return list(csv.DictReader(f))


def torchrun(n, server, out, *extra):
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc-per-node", str(n), "rl_nft.py", *FLAGS, "--scorer-api-base",
                          server.url, "--out", str(out), *map(str, extra)],
                         cwd=ROOT, capture_output=True, text=True, timeout=3600)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def assert_same_run(a, b):
    """Equal rewards and scores, loss and KL within 1e-5 relative, weights within 1e-6."""
    ra, rb = rows_of(a), rows_of(b)
    assert len(ra) == len(rb)
    for x, y in zip(ra, rb):
        for k in x:
            if k in ("loss", "policy_loss", "kl"):
                assert float(x[k]) == pytest.approx(float(y[k]), rel=1e-5), k
            elif k != "seconds":
                assert x[k] == y[k], k
    ca, cb = torch.load(a / "checkpoint.pt"), torch.load(b / "checkpoint.pt")
    for name in ("theta", "old", "ema"):
        assert all(torch.allclose(ca[name][k], cb[name][k], atol=1e-6) for k in ca[name]), name


def test_two_processes_give_the_run_of_one_and_resume_with_one(tmp_path, scripted_server):
    server = scripted_server(brightness_judge)
    one, two, mixed = tmp_path / "one", tmp_path / "two", tmp_path / "mixed"
    assert rl_nft.main([*FLAGS, "--scorer-api-base", server.url, "--out", str(one),
                        "--epochs", "3"]) == 0
    res = torchrun(2, server, two, "--epochs", "3")
    assert_same_run(one, two)
    # rank 0 alone writes and prints: one line per epoch, one bar, no temporary files
    assert res.stdout.count("epoch 3: R=") == 1 and res.stdout.count("done: 3 epochs") == 1
    assert [r["epoch"] for r in rows_of(two)] == ["1", "2", "3"]
    assert not list(two.rglob("*.tmp")) and (two / "args.json").is_file()
    from safetensors.torch import load_file
    la, lb = (load_file(d / "lora" / "epoch_0003" / "pytorch_lora_weights.safetensors")
              for d in (one, two))
    assert la.keys() == lb.keys() and all(torch.allclose(la[k], lb[k], atol=1e-6) for k in la)
    # the process count is not part of the run: 2 epochs on 2 processes, then 1 on one process
    torchrun(2, server, mixed, "--epochs", "2")
    assert rl_nft.main([*FLAGS, "--scorer-api-base", server.url, "--out", str(mixed),
                        "--epochs", "3", "--resume"]) == 0
    assert_same_run(one, mixed)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_worker(rank, port, case, results):
    """One of two ranks of optimise_epoch on a tiny SD3: rank 0's mini-batch is masked out, rank
    1's is kept; case "nan" gives rank 1 a non-finite loss."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2",
                      RANK=str(rank))
    common.init_distributed("cpu", ("sd3",))  # build the tiny SD3 before joining, as rl_nft does
    torch.manual_seed(0)
    args = rl_nft.Args(generator="tiny-random", resolution=64, lora_r=4, lora_alpha=8,
                       sample_steps=2, train_batch_size=2)
    pipe = common.load_generator("tiny-random")
    geo = rl_nft.latent_geometry(pipe, 64, 1.0)
    conds = rl_nft.encode_conditions(pipe, [{"key": "a", "prompt": "a cat", "source": None}], geo)
    params = rl_nft.add_policies(pipe.transformer, args)
    opt = torch.optim.AdamW(params, lr=1e-2)
    order = torch.randperm(4, generator=torch.Generator().manual_seed(0))  # optimise_epoch's
    keep = torch.zeros(4, dtype=torch.bool)
    keep[order[2:]] = True                       # the second mini-batch, which rank 1 computes
    shape = (4, geo.channels, geo.h, geo.w)
    x0 = torch.full(shape, float("nan")) if case == "nan" else torch.randn(shape)
    try:
        step, _ = optimise(dict(transformer=pipe.transformer, optimizer=opt, params=params, sigmas=rl_nft.sampler_sigmas(pipe, 2, geo),
                           geo=geo, args=args), x0, rl_nft.collate(conds, ["a"] * 4, "cpu", torch.float32), torch.tensor([0.9, 0.1, 0.6, 0.4]), keep, torch.Generator().manual_seed(0), 0)
        total = float(sum(p.detach().sum() for p in params))
        results.put((rank, "stepped", step, total))
    except (FloatingPointError, SystemExit) as err:
        results.put((rank, type(err).__name__, str(err)[:80], None))
    # leave the group together: a rank exiting while gloo's threads still run aborts (SIGABRT)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("case", ["masked", "nan"])
def test_a_masked_rank_does_not_hang_and_a_nan_on_one_rank_stops_both(case):
    ctx = torch.multiprocessing.get_context("spawn")
    results = ctx.SimpleQueue()
    torch.multiprocessing.start_processes(rank_worker, args=(free_port(), case, results), nprocs=2,
                                          start_method="spawn", join=True)
    got = sorted(results.get() for _ in range(2))
    if case == "masked":  # both stepped, to the same weights
        assert [g[1:3] for g in got] == [("stepped", 1), ("stepped", 1)]
        assert got[0][3] == pytest.approx(got[1][3], rel=1e-6)
    else:  # rank 0 names the loss, rank 1 stops quietly (exit 2)
        assert got[0][1] == "FloatingPointError" and "the NFT loss became nan" in got[0][2]
        assert got[1][1] == "SystemExit" and got[1][2] == "2"


def test_phase3_on_two_processes_trains_the_student_of_one(tmp_path, scripted_server):
    """The SFT of Phase 3: each rank takes its share of every accumulation window, gradients are
    summed, rank 0 saves; the adapter equals the one-process adapter."""
    import shutil
    from safetensors.torch import load_file
    from test_parrot_cli import teacher_reply
    server = scripted_server(teacher_reply)
    flags = ["--teacher", "served", "--teacher-api-base", server.url, "--dataset", "demo",
             "--limit", "8", "--student", "tiny-random", "--max-new-tokens", "16", "--epochs", "2",
             "--grad-accum", "3", "--eval-fraction", "0.25", "--eval-limit", "2"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert parrot.main([*flags, "--out", str(one), "--phases", "12"]) == 0
    shutil.copytree(one, two)
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc-per-node", "2", "parrot.py", *flags, "--out", str(two),
                          "--phases", "3"], cwd=ROOT, capture_output=True, text=True, timeout=3600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("PARROT report") == 1
    assert parrot.main([*flags, "--out", str(one), "--phases", "3"]) == 0
    la, lb = (json.loads((d / "student_metrics.json").read_text())["train_losses"]
              for d in (one, two))
    assert len(la) == len(lb) > 0 and la == pytest.approx(lb, rel=1e-5)
    wa, wb = (load_file(d / "student" / "adapter_model.safetensors") for d in (one, two))
    assert wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)
    # the teacher phases stay in one process
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc-per-node", "2", "parrot.py", *flags, "--out", str(two),
                          "--phases", "23"], cwd=ROOT, capture_output=True, text=True, timeout=3600)
    assert res.returncode != 0
    assert "error: several processes run Phase 3 (the SFT) only" in res.stderr
