"""PARROT: preference pairs -> rationales -> a student that writes them without the label.

Implements Sec. 2 of "RationalRewards: Reasoning Rewards Scale Visual Generation Both
Training and Test Time" (arXiv 2604.11626). The rationale z is a latent variable; PARROT
maximises the evidence lower bound

    log P(y|x) >= E_{q(z|x,y)}[ log P(y|x,z) ] - KL( q(z|x,y) || P_theta(z|x) )       (ELBO)

    x = (request, image A, image B[, source image])   y = preferred image ("A" or "B")
    z = a pairwise rationale (per-dimension justification, scores, winner; App. C/D)
    q(z|x,y)      = the teacher VLM, shown the label         (Phase 1 builds it)
    P(y|x,z)      = the teacher, label hidden, reading z     (Phase 2 keeps z where it is high)
    P_theta(z|x)  = the student, never shown the label       (Phase 3 fits it to q)

The method comes first, in the order it runs (Phase 1 ``anchored_generation``, Phase 2
``log_p_label`` .. ``consistency_filter``, Phase 3 ``project_pointwise`` .. ``train_student``,
``elbo_report``, the driver ``run_parrot``); after the banner, the harness. Commands and outputs:
README.md, "PARROT"; a killed run started again resumes (every .jsonl is appended per record).

Deviations from the paper:
1. Scale: teacher Qwen3-VL-8B (4-bit), not 32B; student Qwen3-VL-2B with LoRA (QLoRA in 4-bit;
   --lora-r 0: full, vision frozen), not a full fine-tune of Qwen3-VL-8B: lr 1e-4, not 1e-5.
2. Phase 2 reads P(y|x,z) from the answer letter's logits (one forward pass), so the filter
   has a probability, not only a verdict (PARROT's own code and prompts are not released; our
   Phase 1-3 templates follow the paper's App. C/D and the official pairwise prompts' structure).
3. Pointwise SFT samples are the teacher's projections of a kept pairwise rationale onto one
   image, anchored on that image's scores; those straying over 0.5 from the anchors are dropped.
4. `demo`: drawn pairs with one known defect each, so attribution is measured without labels.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import random
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import common  # first: Ctrl-C while the libraries below import is one line, exit 130
# torch: imported where needed (at the top, `--help` would take 3 s instead of 0.3 s on 2 cores)
from PIL import Image, ImageDraw, ImageFilter, ImageFont

import rationalrewards as rr


LOGP_FLOOR = math.log(1e-6)  # log P(y|x,z) is stored floored: a "wrong" answer is not -inf
PROJECTION_TOLERANCE = 0.5   # a pointwise projection may stray this far from its anchor score
PROJECTION_TEMPERATURE = 0.1  # projections copy scores: decode like the scorer does
# what Phase 1 copies from a pair record into each of its rationales
PAIR_FIELDS = ("id", "dataset", "task", "prompt", "image_a", "image_b", "source_image", "label",
               "defect_dimension")
# a sample's LoRA dropout seed: seed x RUN + epoch x EPOCH + its place (primes: docs/REFERENCE.md)
RUN_SEED_STRIDE, EPOCH_SEED_STRIDE = 1_000_003, 100_003

class DataError(ValueError):
    """A dataset is missing or malformed; the message says how to get or fix it."""

# ---- Phase 1: anchored generation, q(z | x, y) ----
def make_pair(dataset, task, prompt, preferred, rejected, seed, source=None, key=None,
              defect=None) -> dict:
    """Seeded shuffle of which image is shown as A, so the student cannot learn "A wins"."""
    pid = key or common.digest(prompt, preferred, rejected, source or "")
    swap = random.Random(f"{seed}:{pid}").random() < 0.5
    a, b = (rejected, preferred) if swap else (preferred, rejected)
    return {"id": pid, "dataset": dataset, "task": task, "prompt": prompt, "image_a": str(a),
            "image_b": str(b), "source_image": str(source) if source else None,
            "label": "B" if swap else "A", "defect_dimension": defect}

def anchored_generation(teacher, pairs: list, out: Path, args: Args) -> None:
    """The teacher sees x and the label y and writes K pairwise rationales per pair."""
    todo = [(p, k) for p in pairs for k in range(args.num_candidates)]
    for batch, save in seeded_batches(todo, out / "phase1.jsonl", "candidate",
                                      "phase 1: anchored generation", "rationale", args):
        images = {p["id"]: images_of(p, "image_a", "image_b") for p, _ in batch}  # once a pair
        msgs = [rr.render_messages(f"anchored_pairwise_{p['task']}", images[p["id"]],
                                   request=p["prompt"], preferred=f"Image {p['label']}")
                for p, _ in batch]
        outs = common.generations(teacher.generate(msgs, args.max_new_tokens, args.temperature))
        save([{**{f: p[f] for f in PAIR_FIELDS}, "candidate": k, "rationale": o.text,
               **({"teacher_note": o.note} if o.note else {})}  # the toy's failure: reports only
              for (p, k), o in zip(batch, outs)])

# ---- Phase 2: predictive consistency filtering, ELBO term 1: E_q[log P(y | x, z)] ----
# P(y|x,z) = P(y) / (P(A) + P(B)), P(a) = the teacher's probability of answer a's first token after
# reading (x, z) with the label hidden: the consistency prompt asks for one of the two answers
def log_p_label(answer: Optional[dict], label: str, answers=("A", "B")) -> Optional[float]:
    """log P(y = label | x, z) from one `answer_logprobs` entry, floored at LOGP_FLOOR; None (not
    readable) stays None. An answer a top-k list left out (None) counts at the smallest log-prob
    listed, "min_listed", its upper bound: at zero mass a lone listed answer would get P = 1."""
    if answer is None:
        return None
    logp = {a: answer["min_listed"] if answer[a] is None else answer[a] for a in answers}
    top = max(logp.values())  # log sum_a P(a) is taken shifted by it: tiny P(a) do not underflow
    log_total = top + math.log(sum(math.exp(v - top) for v in logp.values()))
    return max(LOGP_FLOOR, logp[label] - log_total)

def consistency_verdict(judgement: rr.PairwiseJudgement, label: str, p_label: Optional[float],
                        min_consistency: Optional[float]) -> Optional[str]:
    """Phase 2: None if z is kept, else why dropped. ELBO term 1 asks that y be recoverable from
    (x, z): z's own score sums imply y, then the teacher's P(y|x,z) (None: keep all that parse)."""
    if judgement.preferred is None:
        return "unparseable"
    if min_consistency is None:
        return None
    if judgement.preferred != label:  # label-ignoring or vague: its own scores do not pick y
        return "scores_contradict_label"
    if p_label is None:  # the teacher's answer could not be read: no evidence either way
        return "unreadable_answer"
    if p_label < min_consistency:  # hallucinated or non-predictive evidence
        return "teacher_disagrees"
    return None

def judge_candidates(teacher, candidates: list, min_consistency: float) -> list:
    """ELBO term 1 per Phase 1 candidate z, in order: the teacher's log P(y|x,z), label hidden, one
    forward pass, then `consistency_verdict`: candidate, p_label, log_p_label, reason, judgement."""
    images = {pid: images_of(r, "image_a", "image_b")  # a pair's images, decoded once
              for pid, r in {r["id"]: r for r in candidates}.items()}
    msgs = [rr.render_messages(f"consistency_{r['task']}", images[r["id"]], request=r["prompt"],
                               rationale=r["rationale"]) for r in candidates]
    verdicts = []
    for r, answer in zip(candidates, teacher.answer_logprobs(msgs, ("A", "B"))):
        lp = log_p_label(answer, r["label"])
        p = None if lp is None else math.exp(lp)
        j = rr.parse_pairwise(r["rationale"], r["task"])
        verdicts += [{"candidate": r["candidate"], "p_label": p, "log_p_label": lp, "judgement": j,
                      "reason": consistency_verdict(j, r["label"], p, min_consistency)}]
    return verdicts

def phase2_record(candidates: dict, verdicts: list) -> dict:
    """The pair's Phase 2 record from every verdict so far: the first kept z (its rationale and
    pairwise scores, used by Phase 3), or the last reason for dropping the pair."""
    verdicts = sorted(verdicts, key=lambda v: v["candidate"])
    kept = next((v for v in verdicts if v["reason"] is None), None)
    source = candidates[kept["candidate"] if kept else verdicts[-1]["candidate"]]
    rec = {**{f: source[f] for f in PAIR_FIELDS}, "kept": kept is not None,
           "reason": None if kept else verdicts[-1]["reason"],
           "candidates": [{k: v for k, v in c.items() if k != "judgement"} for c in verdicts]}
    if kept:  # a candidate kept by an earlier run has no judgement object here: parse it again
        j = kept.get("judgement") or rr.parse_pairwise(source["rationale"], source["task"])
        rec.update(candidate=kept["candidate"], rationale=source["rationale"],
                   log_p_label=kept["log_p_label"], scores_a=j.scores_a, scores_b=j.scores_b)
    return rec

def consistency_filter(teacher, out: Path, args: Args) -> None:
    """Judge every Phase 1 candidate once (a rerun: those no run judged); per pair keep the first z
    from which y can be recovered. log P(y|x,z) is read for every candidate, parseable or not, so
    the report estimates ELBO term 1 over all of q(z|x,y), not only over the survivors."""
    phase1 = common.read_jsonl(out / "phase1.jsonl")
    common.require(phase1, f"{out / 'phase1.jsonl'} is missing or empty: run --phases 1 first",
                   DataError)
    todo, n_pairs = unjudged_candidates(phase1, read_phase2(out))
    for batch in batches(todo, max(1, args.batch_size // args.num_candidates),
                         "phase 2: consistency", total=n_pairs, unit="pair"):
        verdicts = iter(judge_candidates(teacher, [r for _, _, new in batch for r in new],
                                         args.min_consistency if args.filter else None))
        for candidates, earlier, new in batch:  # a pair judged before: this record supersedes it
            common.append_jsonl(out / "phase2.jsonl",
                                phase2_record(candidates, earlier + [next(verdicts) for _ in new]))

# ---- Phase 3: foresight distillation, ELBO term 2: min KL(q(z|x,y) || P_theta(z|x)) ----
def format_anchor_scores(scores: dict) -> str:
    return "\n".join(f"- {rr.DIMENSION_TITLES[d]}: {'N/A' if s is None else f'{s:g}'}"
                     for d, s in scores.items())

def projection_matches(critique: rr.Critique, anchors: dict,
                       tolerance: float = PROJECTION_TOLERANCE) -> bool:
    """A pointwise projection is usable if it reproduces every anchored score within `tolerance`
    (an anchor of None, N/A or unreadable in the pairwise rationale, anchors nothing)."""
    got = critique.scores
    return all(a is None or (got.get(d) is not None and abs(got[d] - a) <= tolerance)
               for d, a in anchors.items())

def project_pointwise(teacher, kept: list, out: Path, args: Args) -> None:
    """Two pointwise critiques per kept pair, each anchored on that image's pairwise scores."""
    todo = [(r, s) for r in kept for s in ("A", "B")]
    for batch, save in seeded_batches(todo, out / "projections.jsonl", "side",
                                      "phase 3: pointwise projections", "critique", args):
        msgs = [rr.render_messages(f"projection_{r['task']}", images_of(r, f"image_{s.lower()}"),
                                   request=r["prompt"], side=s, reference=r["rationale"],
                                   anchor_scores=format_anchor_scores(r[f"scores_{s.lower()}"]))
                for r, s in batch]
        texts = [o.text for o in common.generations(
            teacher.generate(msgs, args.max_new_tokens, PROJECTION_TEMPERATURE))]
        save([{"id": r["id"], "side": s, "kept": projection_matches(
                   rr.parse_pointwise(text, r["task"]), r[f"scores_{s.lower()}"]),
               "critique": text} for (r, s), text in zip(batch, texts)])

def sft_sample(kind: str, rec: dict, answer: str, side: Optional[str] = None) -> dict:
    """One sample as LLaMA-Factory and TRL read it (messages + images); the label is never in it."""
    images = paths_of(rec, *(["image_a", "image_b"] if kind == "pairwise" else
                             [f"image_{side.lower()}"]))
    system, user = rr.fill_prompt(f"{kind}_{rec['task']}", request=rec["prompt"])
    messages = [{"role": "system", "content": system}] if system else []
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return {"id": rec["id"], "kind": kind, "side": side, "images": images, "messages": messages}

def is_heldout(prompt: str, fraction: float, seed: int) -> bool:
    """Held-out split by prompt, so no prompt is in both SFT and evaluation."""
    return int(common.digest(f"{seed}:{prompt}")[:8], 16) / 16 ** 8 < fraction

def build_sft(out: Path, args: Args) -> tuple:
    """sft.jsonl (train prompts) and heldout.jsonl (held-out prompts) from Phase 2 + projections."""
    proj = {(p["id"], p["side"]): p for p in common.read_jsonl(out / "projections.jsonl")}
    train, held = [], []
    for r in [r for r in read_phase2(out) if r["kept"]]:
        samples = [sft_sample("pairwise", r, r["rationale"])]
        samples += [sft_sample("pointwise", r, proj[(r["id"], s)]["critique"], s)
                    for s in ("A", "B") if proj.get((r["id"], s), {}).get("kept")]
        (held if is_heldout(r["prompt"], args.eval_fraction, args.seed) else train).extend(samples)
    if common.RANK == 0:
        common.write_atomic(out / "sft.jsonl", "".join(json.dumps(s) + "\n" for s in train))
        common.write_atomic(out / "heldout.jsonl", "".join(json.dumps(s) + "\n" for s in held))
    return train, held

def evaluation_pairs(phase2: list, out: Path, args: Args) -> list:
    """Every labelled held-out pair, kept or not, is fair evaluation data (never in sft.jsonl): at
    most --eval-limit, also written as an `eval` pairs file (paths relative to it: it can move)."""
    pairs = [r for r in phase2 if is_heldout(r["prompt"], args.eval_fraction, args.seed)]
    rel = lambda f: os.path.relpath(Path(f).resolve(), out.resolve())
    recs = [{"id": r["id"], "prompt": r["prompt"], "label": r["label"],
             **{k: rel(r[k]) for k in ("image_a", "image_b", "source_image") if r.get(k)}}
            for r in pairs[:args.eval_limit]]
    if common.RANK == 0:
        common.write_atomic(out / "heldout_pairs.jsonl", "".join(json.dumps(r) + "\n"
                                                                 for r in recs))
    return pairs[:args.eval_limit]

def add_lora(model, args: Args, quantized: bool):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    # non-reentrant checkpointing: the reentrant kind loses LoRA gradients (docs/REFERENCE.md)
    ckpt_kwargs = {"use_reentrant": False}
    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                                gradient_checkpointing_kwargs=ckpt_kwargs)
    elif model.device.type == "cpu":
        pass  # recomputing activations saves accelerator memory; on a CPU it only costs time
    elif hasattr(model, "activation_checkpointing_enable"):  # later transformers 5.x releases
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=ckpt_kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt_kwargs)
    # Language model only: the paper freezes the vision tower.
    if args.lora_r == 0:  # full fine-tuning, the paper's (and the toy student's of the README)
        for name, p in model.named_parameters():
            p.requires_grad_(".visual." not in f".{name}")
        return model
    targets = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
    return get_peft_model(model, LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha,
                                            lora_dropout=0.05, target_modules=targets))

def sample_features(processor, sample: dict, max_pixels: int, device="cpu"):
    """Token ids of (prompt + answer) on `device`, labels -100 on the prompt: loss on the answer."""
    images = [common.load_image(p) for p in sample["images"]]
    unread = [p for p, im in zip(sample["images"], images) if im is None]
    common.require(not unread, f"SFT sample {sample['id']}: cannot read {unread}; the run "
                   "directory's images must stay where Phase 1 found them", ValueError)
    images = [common.bound_pixels(im, max_pixels) for im in images]
    *turns, last = sample["messages"]  # [system,] user (text with <image> markers), assistant
    user = [{"role": t["role"], "content": rr.to_content(t["content"], images)
             if t["role"] == "user" else t["content"]} for t in turns]
    answer = {"role": "assistant", "content": [{"type": "text", "text": last["content"]}]}
    kw = dict(tokenize=True, return_dict=True, return_tensors="pt")
    prompt = processor.apply_chat_template(user, add_generation_prompt=True, **kw)
    full = processor.apply_chat_template(user + [answer], **kw)
    n = prompt["input_ids"].shape[1]
    if not (full["input_ids"][0, :n] == prompt["input_ids"][0]).all():
        raise ValueError("the chat template does not render the prompt as a prefix of the "
                         "conversation; cannot mask the prompt tokens")
    labels = full["input_ids"].clone()  # (1, T)
    labels[:, :n] = -100
    return {k: v.to(device) for k, v in {**full, "labels": labels}.items()}

def answer_nll(model, processor, samples: list, max_pixels: int) -> Optional[float]:
    """Mean per-token NLL of the answers: -1/T sum_t log P_theta(z_t | x, z_<t), token-weighted."""
    import torch
    total, tokens = 0.0, 0
    model.eval()
    with torch.no_grad():
        for s in samples:
            feats = sample_features(processor, s, max_pixels, model.device)
            n = int((feats["labels"][:, 1:] != -100).sum())
            total += float(model(**feats).loss) * n
            tokens += n
    return total / tokens if tokens else None

def student_report(model, processor, held: list, heldout_pairs: list, task: str,
                   args: Args) -> dict:
    """The student on held-out data: its NLL of the kept rationales (ELBO term 2 up to the entropy
    of q) and its preference accuracy, pointwise and pairwise, on the held-out pairs."""
    nll = answer_nll(model, processor, held, args.max_pixels)
    model.eval()  # no LoRA dropout while the student writes critiques
    backend = common.TransformersBackend(model, processor, args.batch_size, args.max_pixels,
                                         name=args.student)  # tiny-random: no truncation warning
    scorer = rr.RationalRewardsScorer(backend, task, args.max_new_tokens, temperature=0.1)
    defect = lambda p: p.get("defect_dimension") or "all"  # demo: each pair's defect is known
    report = {"heldout_nll": nll, "accuracy": {}, "interval95": {}, "by_defect": {}}
    for mode in ("pointwise", "pairwise"):  # the pairs of each defect kind, then all together
        got = {d: rr.evaluate_preferences(scorer, [p for p in heldout_pairs if defect(p) == d],
                                          mode, None, args.batch_size)
               for d in sorted(set(map(defect, heldout_pairs)))}
        k, n = (sum(m[key] for m in got.values()) for key in ("correct_with_ties", "pairs"))
        report["accuracy"][mode] = k / n if n else None
        report["interval95"][mode] = list(rr.wilson_interval(k, n)) if n else None
        report["by_defect"][mode] = {d: m["accuracy_with_ties"] for d, m in got.items()}
    return report


# ELBO term 2: KL(q(z|x,y) || P_theta(z|x)) = E_q[log q(z|x,y)] - E_q[log P_theta(z|x)]. The first
# part, minus the entropy of q, does not depend on theta, so minimising the SFT loss -log
# P_theta(z|x) on samples z ~ q (the kept rationales) minimises the KL term up to that constant.
def foresight_distillation(model, processor, train: list, out: Path, args: Args) -> list:
    """LoRA SFT of the student on the kept rationales, label absent; returns the loss per optimizer
    step. student/ is saved every epoch (an interrupted SFT starts over: docs/REFERENCE.md)."""
    import torch
    from tqdm import tqdm
    from transformers import get_cosine_schedule_with_warmup
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    steps = math.ceil(len(train) / args.grad_accum) * args.epochs
    sched = get_cosine_schedule_with_warmup(opt, int(args.warmup_ratio * steps), steps)
    use_bf16, losses = model.device.type == "cuda", []
    for epoch in range(args.epochs):
        model.train()
        order = list(range(len(train)))
        random.Random(f"{args.seed}:epoch{epoch}").shuffle(order)
        bar = tqdm(total=len(order), desc=f"phase 3: SFT epoch {epoch + 1}/{args.epochs}",
                   unit="sample", disable=common.RANK > 0)
        for n, share in accumulation_windows(order, args.grad_accum):  # one optimizer step each
            own = 0.0  # sum of loss / grad_accum over this process's share of the window
            for i, idx in share:
                # LoRA dropout seeded per sample: N processes draw the masks one process would
                torch.manual_seed(args.seed * RUN_SEED_STRIDE + epoch * EPOCH_SEED_STRIDE + i)
                feats = sample_features(processor, train[idx], args.max_pixels, model.device)
                with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=use_bf16):
                    loss = model(**feats).loss / args.grad_accum
                loss.backward()
                own += loss.item()
            common.sum_gradients(params)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(window_loss(own, n, args.grad_accum))
            bar.update(n)
            bar.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{sched.get_last_lr()[0]:.2e}")
        bar.close()
        if common.RANK == 0:
            with common.saving(out / "student"):
                model.save_pretrained(out / "student")
                processor.save_pretrained(out / "student")  # --lora-r 0: a whole model folder
    return losses

def train_student(out: Path, train: list, held: list, heldout_pairs: list, task: str,
                  args: Args) -> dict:
    """LoRA SFT of the student on `train`, measured before and after on the held-out samples and
    pairs; returns (and writes) student_metrics.json."""
    import torch
    ckpt, metrics_path, lead = out / "student", out / "student_metrics.json", common.RANK == 0
    metrics = common.broadcast(student_metrics_for(out, train, args) if lead else None)
    if "after" in metrics:
        return metrics  # a finished run, started again on the same data: nothing to redo
    torch.manual_seed(args.seed)
    model, processor = common.load_vlm(args.student, args.student_quantization, trainable=True,
                                       device=args.device,  # full: fp32 weights, bf16 autocast
                                       dtype=None if args.lora_r else torch.float32)
    model = add_lora(model, args, args.student_quantization == "4bit")
    # several processes: every rank trains, rank 0 alone measures and writes
    if "before" not in metrics and lead:  # LoRA starts at zero: the student is the base model
        metrics["before"] = student_report(model, processor, held, heldout_pairs, task, args)
        common.write_atomic(metrics_path, json.dumps(metrics))
    if not train:  # still a loadable student/ (LoRA at zero), so the rest of the chain runs
        common.warn("no SFT samples survived Phases 1-2; student/ holds an untrained adapter (the "
                    "base model)")
        if lead:
            with common.saving(ckpt):
                model.save_pretrained(ckpt)
                processor.save_pretrained(ckpt)
        metrics["after"], metrics["train_losses"] = metrics["before"], []
        common.write_atomic(metrics_path, json.dumps(metrics))
        return metrics
    metrics["train_losses"] = foresight_distillation(model, processor, train, out, args)
    if lead:
        metrics["after"] = student_report(model, processor, held, heldout_pairs, task, args)
        metrics.update(sft_samples=len(train), heldout_samples=len(held),
                       heldout_pairs=len(heldout_pairs))
        common.write_atomic(metrics_path, json.dumps(metrics))
    return metrics

# ---- The ELBO report ----
def score_statistics(kept: list, dims: tuple) -> dict:
    """Per dimension over the kept rationales: mean score, mean |A - B| gap, readable scores."""
    stats = {}
    for d in dims:
        vals = [r[k][d] for r in kept for k in ("scores_a", "scores_b") if r[k][d] is not None]
        gaps = [abs(r["scores_a"][d] - r["scores_b"][d]) for r in kept
                if None not in (r["scores_a"][d], r["scores_b"][d])]
        stats[d] = {"mean": sum(vals) / len(vals) if vals else None,
                    "mean_abs_gap": sum(gaps) / len(gaps) if gaps else None,
                    "readable": len(vals)}
    return stats

def largest_gap_dimension(scores_a: dict, scores_b: dict) -> Optional[str]:
    """The dimension where the rationale separates the two images most (ties: rubric order)."""
    gaps = {d: abs(scores_a[d] - scores_b[d]) for d in scores_a
            if scores_a.get(d) is not None and scores_b.get(d) is not None}
    return max(gaps, key=gaps.get) if gaps and max(gaps.values()) != 0 else None

def toy_filter_table(phase1: list, phase2: list) -> dict:
    """Phase 2 scored against the toy teacher's known failures (a simulation): per failure kind it
    recorded (`teacher_note`), how many rationales the filter dropped and kept; "none" counts the
    clean ones, "blind_spot" the clean ones on pairs whose defect the toy cannot see (a word)."""
    passed = {(r["id"], c["candidate"]): c["reason"] is None
              for r in phase2 for c in r.get("candidates", [])}
    table = {k: {"rationales": 0, "dropped": 0, "kept": 0}
             for k in (*common.TOY_FAILURES, "none", "blind_spot")}
    for r in phase1:
        if "teacher_note" in r and (r["id"], r["candidate"]) in passed:
            blind = r["teacher_note"] == "none" and r["defect_dimension"] == "text_rendering"
            row = table["blind_spot" if blind else r["teacher_note"]]
            row["rationales"] += 1
            row["kept" if passed[(r["id"], r["candidate"])] else "dropped"] += 1
    return table

def elbo_report(out: Path, inputs: dict, student: Optional[dict]) -> dict:
    """What the phases wrote in `out` (`inputs`: the loader's counts; `student`: its metrics), with
    the bound log P(y|x) >= term 1 - term 2 as its two measured parts, not as one number:
    term 1 = E_q[log P(y|x,z)], nats per pair: elbo_term1_all_candidates, over every Phase 1
      candidate z ~ q(z|x,y), dropped ones included (Phase 2's teacher, label hidden);
    term 2 = KL(q || P_theta) = E_q[-log P_theta(z|x)] - H(q): elbo_term2_heldout_nll, the student's
      NLL of the held-out SFT answers per answer token; H(q) is not estimated."""
    phase1, phase2 = common.read_jsonl(out / "phase1.jsonl"), read_phase2(out)
    kept = [r for r in phase2 if r["kept"]]
    candidates = [c for r in phase2 for c in r.get("candidates", [])]
    # ELBO term 1, E_{q(z|x,y)}[log P(y|x,z)]: every candidate z that q produced, not only survivors
    all_lp = [c["log_p_label"] for c in candidates if c.get("log_p_label") is not None]
    kept_lp = [r["log_p_label"] for r in kept if r.get("log_p_label") is not None]
    report = {
        "raw_pairs": inputs.get("rows_read"), "pairs": inputs.get("pairs"),
        "skipped_inputs": {k: v for k, v in inputs.items() if k.startswith(("skipped", "dropped"))},
        "phase1_rationales": len(phase1),
        "phase1_parse_failures": sum(
            rr.parse_pairwise(r["rationale"], r["task"]).preferred is None for r in phase1),
        "phase2_pairs": len(phase2), "kept": len(kept),
        "drops_by_reason": {k: sum(r["reason"] == k for r in phase2) for k in (
            "unparseable", "scores_contradict_label", "unreadable_answer", "teacher_disagrees")},
        "retention_rate": len(kept) / len(phase2) if phase2 else None, "paper_retention_rate": 0.72,
        "elbo_term1_all_candidates": sum(all_lp) / len(all_lp) if all_lp else None,
        "elbo_term1_candidates_scored": len(all_lp),
        "unreadable_teacher_answers": sum(c.get("log_p_label") is None for c in candidates),
        # kept rationales only: bounded below by the filter, it describes the SFT data, not a bound
        "mean_log_p_y_given_xz_kept": sum(kept_lp) / len(kept_lp) if kept_lp else None,
        "score_statistics": score_statistics(kept, rr.dimensions(phase2[0]["task"])
                                             if phase2 else ()),
        "elbo_term2_heldout_nll": ((student or {}).get("after") or {}).get("heldout_nll"),
    }
    proj = common.read_jsonl(out / "projections.jsonl")
    if proj:  # Phase 3's own filter: pointwise projections that kept their anchor scores
        report["phase3_projections"] = {"kept": sum(p["kept"] for p in proj),
                                        "dropped_score_stray": sum(not p["kept"] for p in proj)}
        report["sft_samples"] = {k: len(common.read_jsonl(out / f"{f}.jsonl"))
                                 for k, f in (("train", "sft"), ("heldout", "heldout"))}
    if any(r.get("defect_dimension") for r in phase2):  # demo: each pair's defect is known
        hits = [largest_gap_dimension(r["scores_a"], r["scores_b"]) == r["defect_dimension"]
                for r in kept]  # none kept: None, said so in the table, nothing to attribute
        report["attribution_accuracy"] = sum(hits) / len(hits) if hits else None
    if student:  # before and after SFT: held-out NLL (term 2's measured part) and accuracy
        report["student"] = student
    if any("teacher_note" in r for r in phase1):  # the toy teacher: its failures are known
        report["toy_filter"] = toy_filter_table(phase1, phase2)
    return report

# ---- PARROT: Phase 1 -> Phase 2 -> Phase 3 -> the ELBO report ----
def run_parrot(teacher, out: Path, args: Args) -> None:
    """The method: the phases of --phases in order, each reading what the ones before it wrote in
    `out` (in this run or an earlier one); the report (report.json) covers all that is there."""
    if "1" in args.phases:  # q(z|x,y): K rationales per pair, the teacher shown the label
        pairs, _ = load_dataset_pairs(args)
        anchored_generation(teacher, pairs, out, args)
    if "2" in args.phases:  # ELBO term 1: keep z where P(y|x,z) says y is recoverable from it
        consistency_filter(teacher, out, args)
    student = None
    if "3" in args.phases:  # ELBO term 2: fit the student P_theta(z|x) to the kept z
        phase2 = read_phase2(out)
        common.require(phase2, f"{out / 'phase2.jsonl'} is missing or empty: run --phases 2 first",
                       DataError)
        if common.RANK == 0:  # several processes: rank 0 asks the teacher, the others wait
            project_pointwise(teacher, [r for r in phase2 if r["kept"]], out, args)
        common.broadcast(None)
        train, held = build_sft(out, args)  # sft.jsonl / heldout.jsonl
        teacher.release()  # free the teacher's memory before the student trains
        heldout = evaluation_pairs(phase2, out, args)  # also heldout_pairs.jsonl
        # foresight distillation (resumed if the SFT data is the same); the student before/after
        student = train_student(out, train, held, heldout, phase2[0]["task"], args)
    if common.RANK == 0:  # several processes: rank 0 alone reports
        student = student if student is not None else read_json(out / "student_metrics.json")
        report = elbo_report(out, read_json(out / "inputs.json", {}), student)
        common.write_atomic(out / "report.json", json.dumps(report, indent=2) + "\n")
        print(f"PARROT report ({out / 'report.json'}):\n{json.dumps(report, indent=2)}")


# =======================================================================================
# The method ends here. Below: the `parrot` command (flags, datasets, resume, preflight, main).
# =======================================================================================
@dataclass
class Args:
    dataset: Literal["demo", "hpdv3", "rapidata", "editreward", "jsonl"] = "demo"
    """where the preference pairs come from"""
    data_dir: Optional[str] = common.default_text("data/hpdv3 for hpdv3")
    """hpdv3: the dataset root (train.json, test.json, images); jsonl: the pairs file"""
    hf_dataset: Optional[str] = common.default_text("the dataset's id on the hub")
    """rapidata/editreward: hub id, or a local parquet file or directory"""
    split: str = "train"
    """dataset split to read"""
    limit: Optional[int] = common.default_text("all; demo: 64")
    """use at most this many valid pairs"""
    min_vote_margin: float = 0.1
    """drop near-ties: rapidata, winning vote share below 0.5 + this; editreward, score gap 4x"""
    teacher: str = "Qwen/Qwen3-VL-8B-Instruct"
    """teacher VLM (hub id, local path, tiny-random); with --teacher-api-base, the served name;
    toy: a demonstration teacher for demo pairs, not a VLM (common.ToyTeacher)"""
    teacher_api_base: Optional[str] = common.default_text("none: the teacher is loaded here")
    """OpenAI-compatible endpoint serving the teacher (vLLM, SGLang): a 32B teacher, many GPUs"""
    teacher_quantization: Literal["auto", "4bit", "8bit", "none"] = "auto"
    """auto = 4-bit on a GPU, none on CPU"""
    student: str = "Qwen/Qwen3-VL-2B-Instruct"
    """student VLM trained in Phase 3"""
    student_quantization: Literal["none", "4bit"] = "none"
    """4bit trains with QLoRA"""
    batch_size: int = 8
    """prompts per generate() call, or requests in flight over HTTP"""
    max_pixels: int = 768 * 768
    """images are downscaled to at most this many pixels"""
    num_candidates: int = 1
    """K rationales sampled per pair in Phase 1; Phase 2 keeps the first that passes"""
    temperature: float = 0.7
    """teacher sampling temperature in Phase 1"""
    max_new_tokens: Optional[int] = common.default_text("2048; teacher tiny-random: 64, toy: 256")
    """longest rationale of the teacher and the student"""
    min_consistency: float = 0.5
    """Phase 2 keeps z only if the teacher's P(y|x,z) is at least this"""
    epochs: int = 3
    """Phase 3 epochs (paper: 3)"""
    lr: float = 1e-4
    """Phase 3 peak learning rate (paper, full fine-tune: 1e-5; LoRA wants more)"""
    warmup_ratio: float = 0.05
    """share of steps with linear warm-up before the cosine decay (paper: 0.05)"""
    grad_accum: int = 8
    """samples per optimizer step"""
    lora_r: int = 16
    """LoRA rank of the student; 0: full fine-tuning of its language model (vision frozen)"""
    lora_alpha: int = 32
    """LoRA alpha of the student"""
    eval_fraction: float = 0.1
    """share of prompts held out from SFT for the report"""
    eval_limit: int = 100
    """at most this many held-out pairs are used for the student's accuracy"""
    out: str = "runs/parrot"
    """run directory: every output, resumable"""
    phases: str = "123"
    """which phases to run, e.g. 1, 2, 3 or 12; each reads the outputs of the ones before"""
    seed: int = 0
    """seed for the A/B shuffle, the held-out split, sampling and training"""
    device: Optional[str] = common.default_text("cuda if any")
    """where the local teacher and the student run: cuda, cuda:1, cpu"""
    prompts_dir: Optional[str] = common.default_text("ours, in prompts/")
    """a folder of templates named as in prompts/ that replace ours (e.g. other Phase 1 wording)"""
    toy_failure_rate: float = 0.3
    """--teacher toy: the share of Phase 1 rationales with a failure of App. F (a simulation)"""
    flip_labels: bool = False
    """a control: every label flipped, so the teacher is anchored on the rejected image"""
    filter: bool = True
    """--no-filter, a control: Phase 2 keeps every rationale it parses (term 1 measured, unused)"""


# the hub datasets: their default id and the columns of the prompt, the images and the source
HUB = {"rapidata": {"id": "Rapidata/700k_Human_Preference_Dataset_FLUX_SD3_MJ_DALLE3",
                    "prompt": "prompt", "a": "image1", "b": "image2", "src": None},
       "editreward": {"id": "TIGER-Lab/EditReward-Data", "prompt": "instruction",
                      "a": "left_output_image", "b": "right_output_image", "src": "source_img"}}

# ---- Datasets: each loader yields pairs (`make_pair`) and counts what it skipped, why, in `stats`
def _skip(problem: Optional[str], what: str, stats: dict) -> bool:
    """Count and warn about a pair left out for a missing or unreadable image (True: skipped)."""
    if problem:
        stats["skipped_missing_image" if problem == "missing" else "skipped_corrupt_image"] += 1
        common.warn(f"{what}: {problem}: pair skipped")
    return bool(problem)

def _readable(paths, stats) -> bool:
    """Every image of the pair can be read; else its first problem is counted and warned about."""
    return not any(_skip(common.read_image(p)[1], f"image {p}", stats) for p in paths if p)

def hpdv3_index(root: Optional[str], split: str) -> Path:
    """HPDv3's index file, or what to do when it is not there (the preflight and the loader)."""
    index = Path(root or "data/hpdv3") / f"{split}.json"
    root = index.parent
    common.require(index.is_file(), f"HPDv3 not found: {index} does not exist. Download and "
                   f"extract it (about 100 GB for all images):\n  hf download MizzenAI/HPDv3 "
                   f"--repo-type dataset --local-dir {root}\n  cd {root} && cat images.tar.gz.* | "
                   f"tar -xzf -\nthen pass --data-dir {root}.", DataError)
    return index

def load_hpdv3(root, split, seed, stats):
    index = hpdv3_index(root, split)
    try:
        rows = json.loads(index.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{index} is not valid JSON ({err})") from None
    common.require(isinstance(rows, list), f"{index}: expected a JSON list of records, got "
                   f"{type(rows).__name__}", DataError)
    for n, rec in enumerate(rows):
        common.require(isinstance(rec, dict) and all(isinstance(rec.get(k), str) for k in (
            "prompt", "path1", "path2")), f"{index}, row {n}: expected string fields prompt, "
            f"path1 (preferred), path2 (rejected), got {str(rec)[:200]}", DataError)
        stats["rows_read"] += 1
        good, bad = index.parent / rec["path1"], index.parent / rec["path2"]  # path1 preferred
        if _readable([good, bad], stats):  # the id from the row, however --data-dir is spelled
            key = common.digest(rec["prompt"], rec["path1"], rec["path2"])
            yield make_pair("hpdv3", "t2i", rec["prompt"], good, bad, seed, key=key)

def load_jsonl(path, seed, stats):
    common.require(path, "--dataset jsonl needs --data-dir PATH/TO/pairs.jsonl", DataError)
    for rec in rr.read_pairs(path):
        stats["rows_read"] += 1
        if rec["label"] == "tie":
            stats["dropped_ties"] += 1
            continue
        good, bad = (rec["image_b"], rec["image_a"]) if rec["label"] == "B" else \
            (rec["image_a"], rec["image_b"])
        src = rec.get("source_image")
        if _readable([good, bad, src], stats):
            yield make_pair("jsonl", "edit" if src else "t2i", rec["prompt"], good, bad, seed, src,
                            rec["id"])

def _vote_label(row, dataset, margin):
    """'first', 'second', 'tie' or 'near_tie' from the vote fields of one hub row."""
    if dataset == "editreward":
        vote = str(row.get("vote_type", "")).lower()
        gap = (row.get("left_overall_score") or 0) - (row.get("right_overall_score") or 0)
        if vote not in ("leftvote", "rightvote"):  # a tie, or no vote
            return "tie"
        return "near_tie" if abs(gap) < 4 * margin else \
            ("first" if vote == "leftvote" else "second")
    for k1, k2 in (("weighted_results_image1_preference", "weighted_results_image2_preference"),
                   ("votes_image1", "votes_image2"), ("image1_votes", "image2_votes")):
        if row.get(k1) is not None and row.get(k2) is not None:
            v1, v2 = float(row[k1]), float(row[k2])
            if v1 == v2:
                return "tie"
            share = max(v1, v2) / (v1 + v2)
            return "near_tie" if share < 0.5 + margin else ("first" if v1 > v2 else "second")
    raise DataError(
        f"{dataset}: no vote fields in row with columns {sorted(row)}; expected e.g. "
        "votes_image1/votes_image2 or weighted_results_image1_preference/..._image2_preference")

def load_hub(dataset, hf_id, split, seed, margin, image_dir, stats):
    """Rapidata (t2i) or EditReward (edit) parquet, streamed so --limit N reads about N rows."""
    hf_id, cols = hf_id or HUB[dataset]["id"], HUB[dataset]
    hint = common.dataset_download_hint(hf_id, f"data/{dataset}", "--hf-dataset",
                                        f"data/{dataset}/data (a parquet file or a directory)")
    try:
        ds = common.open_parquet_stream(hf_id, split, [c for c in (cols["a"], cols["b"],
                                                                   cols["src"]) if c], hint=hint)
    except common.ModelLoadError as err:
        raise DataError(str(err)) from None
    for i, row in enumerate(ds):
        stats["rows_read"] += 1
        verdict = _vote_label(row, dataset, margin)
        if verdict in ("tie", "near_tie"):
            stats["dropped_ties" if verdict == "tie" else "dropped_near_ties"] += 1
            continue
        key = str(row.get("unique_key") or row.get("id")
                  or common.digest(row[cols["prompt"]], dataset, split, i))
        paths = {p: image_dir / f"{key}-{p}.png" for p in ("a", "b", "src") if cols[p]}
        problem = next(filter(None, (common.save_embedded_image(row.get(cols[p]), path)
                                     for p, path in paths.items())), None)  # the first one only
        if _skip(problem, f"row {i} of {hf_id} ({key}): image", stats):
            continue
        good, bad = (paths["a"], paths["b"]) if verdict == "first" else (paths["b"], paths["a"])
        yield make_pair(dataset, "edit" if cols["src"] else "t2i", row[cols["prompt"]], good, bad,
                        seed, paths.get("src"), key)


# demo: shapes, colours, counts, words drawn with PIL (colours and number words: common.py, which
# the toy teacher's eyes share); the rejected image has one known defect
SHAPES = ("circle", "square", "triangle")
WORDS = ("CAT", "SUN", "TREE", "BOOK", "MOON", "FISH", "STAR", "BIKE")

def draw_scene(colour, shape, count, word=None, size=256) -> Image.Image:
    """A demo image: `count` shapes of a colour in a row, or a coloured sign with a black word."""
    img, fill = Image.new("RGB", (size, size), "white"), common.COLOURS[colour]
    d = ImageDraw.Draw(img)
    if word is not None:
        d.rectangle([20, 70, size - 20, size - 70], fill=fill, outline="black", width=3)
        font = ImageFont.load_default(size=48)
        d.text(((size - d.textlength(word, font=font)) / 2, size / 2 - 28), word, fill="black",
               font=font)
        return img
    cell = size // count
    for i in range(count):
        cx, cy, r = cell * i + cell // 2, size // 2, min(cell // 2 - 8, 60)
        box = [cx - r, cy - r, cx + r, cy + r]
        if shape == "triangle":
            d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
        else:
            (d.ellipse if shape == "circle" else d.rectangle)(box, fill=fill)
    return img

def degrade(img: Image.Image, rng: random.Random) -> Image.Image:
    """A physical/visual-quality defect: blur, heavy noise and blocky artifacts."""
    img = Image.blend(img.filter(ImageFilter.GaussianBlur(3)),
                      Image.effect_noise(img.size, 90).convert("RGB"), 0.45)
    d = ImageDraw.Draw(img)
    for _ in range(6):
        x, y = rng.randrange(0, img.width - 40), rng.randrange(0, img.height - 40)
        d.rectangle([x, y, x + 40, y + 40], fill=tuple(rng.randrange(256) for _ in range(3)))
    return img

def demo_pair(index: int, seed: int, image_dir: Path) -> dict:
    rng = random.Random(f"demo:{seed}:{index}")
    colour, shape = rng.choice(sorted(common.COLOURS)), rng.choice(SHAPES)
    kind = index % 3  # one object of a colour and shape; a counted number; one under a word
    count = rng.randint(2, 4) if kind == 1 else 1
    word = rng.choice(WORDS) if kind == 2 else None
    prompt = [f"a {colour} {shape} on a white background",
              f"{common.NUMBER_WORDS[count]} {colour} {shape}s in a row on a white background",
              f'a {colour} sign with the word "{word}" written on it in black letters'][kind]
    defect = rng.choice(["text_faithfulness", "physical_quality"] +
                        (["text_rendering"] if word else []))
    good = draw_scene(colour, shape, count, word)
    if defect == "physical_quality":
        bad = degrade(good, rng)
    elif defect == "text_rendering":  # two letters swapped (a doubled letter: the last replaced)
        i = rng.randrange(len(word) - 1)
        typo = word[:i] + word[i + 1] + word[i] + word[i + 2:]
        typo = typo if typo != word else word[:-1] + ("X" if word[-1] != "X" else "Y")
        bad = draw_scene(colour, shape, count, typo)
    elif kind == 1:  # wrong count
        bad = draw_scene(colour, shape, count + rng.choice([-1, 1]), word)
    else:  # wrong colour
        other = rng.choice([c for c in sorted(common.COLOURS) if c != colour])
        bad = draw_scene(other, shape, count, word)
    key = f"demo-{seed}-{index:05d}"
    paths = [image_dir / f"{key}-good.png", image_dir / f"{key}-bad.png"]
    for p, im in zip(paths, (good, bad)):
        if common.load_image(p) is None:  # missing, or truncated by a killed run
            common.save_image_atomic(im, p)
    return make_pair("demo", "t2i", prompt, paths[0], paths[1], seed, key=key, defect=defect)

def load_dataset_pairs(args: Args) -> tuple:
    stats = dict.fromkeys(("rows_read", "skipped_missing_image", "skipped_corrupt_image",
                           "dropped_ties", "dropped_near_ties"), 0)
    image_dir = Path(args.out) / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    if args.dataset == "demo":
        pairs = [demo_pair(i, args.seed, image_dir) for i in range(args.limit or 64)]
        stats["rows_read"] = len(pairs)
    else:  # the loaders yield valid pairs: stopped after --limit of them, they read no further
        pairs = list(itertools.islice(
            load_hpdv3(args.data_dir, args.split, args.seed, stats) if args.dataset == "hpdv3" else
            load_jsonl(args.data_dir, args.seed, stats) if args.dataset == "jsonl" else
            load_hub(args.dataset, args.hf_dataset, args.split, args.seed, args.min_vote_margin,
                     image_dir, stats), args.limit))
    if args.flip_labels:  # the control: the teacher is anchored on the rejected image
        pairs = [{**p, "label": "B" if p["label"] == "A" else "A"} for p in pairs]
    stats["pairs"] = len(pairs)
    common.write_atomic(Path(args.out) / "inputs.json", json.dumps(stats))  # for later reports
    print(f"{len(pairs)} pairs from {args.dataset} ({stats})", file=sys.stderr)
    return pairs, stats

# ---- Helpers shared by the phases ----
def paths_of(rec: dict, *parts) -> list:
    """The pair's image paths in prompt order (source first for editing)."""
    return [rec[k] for k in (["source_image"] if rec["task"] == "edit" else []) + list(parts)]

def images_of(rec: dict, *parts) -> list:
    return [common.load_image(p) for p in paths_of(rec, *parts)]

def batches(items: list, size: int, desc: str, total: int, unit: str):
    """`items` (what is left of `total`) in slices of `size`, with a bar; a resume is said."""
    from tqdm import tqdm
    if len(items) < total:
        print(f"{desc}: resumed, {total - len(items)} of {total} already done", file=sys.stderr)
    with tqdm(total=len(items), desc=desc, unit=unit, disable=not items) as bar:
        for i in range(0, len(items), size):
            yield items[i:i + size]
            bar.update(len(items[i:i + size]))

# ---- Resume: which records are done (every .jsonl is appended one whole record at a time) ----
def seeded_batches(items: list, path: Path, field: str, desc: str, unit: str, args: Args):
    """Fixed slices of `items` ((record, k) pairs, k its `field` in `path`): each with any (id, k)
    not yet in `path` is yielded whole, with `save` (appends its records not there yet) and torch's
    sampling seeded from --seed and its place, so a resume samples the same (docs/REFERENCE.md)."""
    import torch
    size, done = args.batch_size, {(r["id"], r[field]) for r in common.read_jsonl(path)}

    def save(records: list) -> None:
        for r in records:
            if (r["id"], r[field]) not in done:  # a pair listed twice is written once
                common.append_jsonl(path, r)
                done.add((r["id"], r[field]))
    left = [i for i in range(0, len(items), size)
            if not all((r["id"], k) in done for r, k in items[i:i + size])]
    slices = batches([items[i:i + size] for i in left], 1, desc, math.ceil(len(items) / size),
                     f"batch of {unit}s")
    for [batch], i in zip(slices, left):  # slices first: it says "resumed" even if nothing is left
        torch.manual_seed(int(common.digest(f"{args.seed}:{desc}:{i}")[:8], 16))
        yield batch, save

def read_phase2(out: Path) -> list:
    """One record per pair: the latest written (a rerun with more candidates supersedes it)."""
    return list({r["id"]: r for r in common.read_jsonl(out / "phase2.jsonl")}.values())

def unjudged_candidates(phase1: list, phase2: list) -> tuple:
    """Per pair with candidates no run judged (say, Phase 1 ran again with more): (its candidates
    {k: record}, earlier verdicts, the new candidates in order), and how many pairs Phase 1 has."""
    judged, by_id = {r["id"]: r["candidates"] for r in phase2}, {}
    for r in phase1:
        by_id.setdefault(r["id"], {})[r["candidate"]] = r  # a rerun of Phase 1 cannot duplicate
    todo = [(cands, judged.get(pid, []), [cands[k] for k in sorted(cands) if k not in
                                          {c["candidate"] for c in judged.get(pid, [])}])
            for pid, cands in by_id.items()]
    return [t for t in todo if t[2]], len(by_id)

def read_json(path: Path, missing=None):
    """An earlier run's inputs.json or student_metrics.json, for the report; `missing` if none."""
    return json.loads(path.read_text()) if path.is_file() else missing


# what the student depends on besides sft.jsonl: a change trains it again, and is said
SFT_KEYS = ("student", "student_quantization", "epochs", "lr", "warmup_ratio", "grad_accum",
            "lora_r", "lora_alpha", "max_pixels", "eval_limit", "seed")

def student_metrics_for(out: Path, train: list, args: Args) -> dict:
    """student_metrics.json of an earlier SFT on exactly this data and settings, else anew."""
    settings = {k: getattr(args, k) for k in SFT_KEYS}
    data = common.digest(json.dumps(train, sort_keys=True))
    metrics = read_json(out / "student_metrics.json", {})
    old = metrics.get("sft_settings", {})
    changed = [f"--{k.replace('_', '-')}: {old.get(k)!r} then, {v!r} now"
               for k, v in settings.items() if old.get(k) != v]
    changed += ["sft.jsonl"] if metrics.get("sft_data") != data else []
    if metrics and changed:
        common.warn(f"{'; '.join(changed)} since the student was trained: training it again "
                    "from the base model")
        metrics = {}
        shutil.rmtree(out / "student", ignore_errors=True)
    metrics.update(sft_settings=settings, sft_data=data)
    return metrics

# ---- Several processes in the SFT (torchrun): each takes a share of every optimizer step ----
def accumulation_windows(order: list, grad_accum: int):
    """Per optimizer step: its sample count and rank r's (place in epoch, index) r, r + N, ..."""
    items = list(enumerate(order))
    for start in range(0, len(items), grad_accum):
        window = items[start:start + grad_accum]
        yield len(window), window[common.RANK::common.WORLD]

def window_loss(own: float, n: int, grad_accum: int) -> float:
    """One optimizer step's logged loss, (1/n) sum_s L_s over its n samples (token-mean NLLs)."""
    return sum(common.gather(own)) * grad_accum / n

class LazyTeacher:
    """The teacher, loaded on first use (none when nothing is left) and freed before the SFT."""

    def __init__(self, args: Args):
        self.args, self.backend = args, None

    def _call(self, method: str, *args, **kwargs):
        """backend.method(...); a failed request stops the phase, saying how to start a server."""
        a = self.args
        if self.backend is None:  # loading (or building tiny-random) leaves the seeded RNG as is
            import torch
            with torch.random.fork_rng(devices=[]):
                self.backend = common.ToyTeacher(a.toy_failure_rate) if a.teacher == "toy" else \
                    common.load_backend(a.teacher, a.teacher_api_base, None,
                                        a.teacher_quantization, a.batch_size, a.max_pixels,
                                        a.device)
        try:
            outs = getattr(self.backend, method)(*args, **kwargs)
            for o in common.generations(outs) if method == "generate" else []:
                common.require(not o.error, o.error, common.BackendError)  # the first failure
            return outs
        except common.BackendError as err:
            hint = (f"\nIs the teacher served at {a.teacher_api_base}? Start it with\n  vllm "
                    f"serve {a.teacher} --port 8000\nand pass --teacher-api-base http://localhost:"
                    "8000/v1 (everything done so far is kept: rerun to continue)"
                    if a.teacher_api_base else "")
            raise common.BackendError(f"{err}{hint}") from None

    def generate(self, *args, **kwargs) -> list:
        return self._call("generate", *args, **kwargs)

    def answer_logprobs(self, *args, **kwargs):
        return self._call("answer_logprobs", *args, **kwargs)

    def release(self):
        import torch
        self.backend = None
        torch.cuda.empty_cache()  # a no-op where CUDA was never used

# ---- main ----
def check_model_available(name: str, what: str = "model") -> None:
    """Fail before hours of work, not after them: the VLM's config, read by `from_pretrained`."""
    if name not in ("tiny-random", "toy"):  # built here, or no model at all (ToyTeacher)
        from transformers import AutoConfig
        common.from_pretrained(AutoConfig.from_pretrained, name, what)

def preflight(args: Args, out: Path) -> None:
    """Every input the run needs (student, dataset, teacher), checked before any work, at once."""
    checks = []
    if "3" in args.phases:
        checks.append(lambda: check_model_available(args.student, "student"))
    if "1" in args.phases:
        checks.append(lambda: check_dataset(args))
        if not args.teacher_api_base and not (out / "phase1.jsonl").is_file():
            checks.append(lambda: check_model_available(args.teacher, "teacher"))
    problems = []
    for check in checks:
        try:
            check()
        except (common.ModelLoadError, DataError) as err:
            problems.append(str(err))
    if problems:
        raise common.ModelLoadError(problems[0] if len(problems) == 1 else
                                    f"{len(problems)} inputs of this run are missing:\n" +
                                    "\n".join(f"{n}. {p}" for n, p in enumerate(problems, 1)))

def check_dataset(args: Args) -> None:
    """Is the dataset where the loader will look? (the loaders say the same when they read it)"""
    if args.dataset == "hpdv3":
        hpdv3_index(args.data_dir, args.split)
    elif args.dataset == "jsonl" and not (args.data_dir and Path(args.data_dir).is_file()):
        raise DataError(
            f"--dataset jsonl needs --data-dir PATH/TO/pairs.jsonl (got {args.data_dir!r})")
    elif args.dataset in HUB and args.hf_dataset and \
            args.hf_dataset.startswith(("/", ".", "~")) and not Path(args.hf_dataset).exists():
        raise DataError(f"--hf-dataset {args.hf_dataset} does not exist")


# the settings each phase's file binds: a rerun that changes one is refused (docs/REFERENCE.md)
BOUND_BY = {"phase1.jsonl": ("dataset", "data_dir", "hf_dataset", "split", "min_vote_margin",
                             "seed", "teacher", "teacher_api_base", "teacher_quantization",
                             "temperature", "max_new_tokens", "max_pixels", "prompts_dir",
                             "toy_failure_rate", "flip_labels"),
            "phase2.jsonl": ("min_consistency", "filter")}

def main(argv=None) -> int:
    args = common.parse(Args, argv, description=__doc__.split("\n\n")[0])
    common.require(args.phases and set(args.phases) <= set("123"),
                   f"--phases takes digits 1, 2, 3 (e.g. 123, 2, 23), got {args.phases!r}")
    if args.max_new_tokens is None:
        args.max_new_tokens = {"tiny-random": rr.TINY_MAX_NEW_TOKENS, "toy": 256}.get(args.teacher,
                                                                                      2048)
    common.require_positive(args, "limit", "num_candidates", "batch_size", "max_new_tokens",
                            "max_pixels", "epochs", "grad_accum", "eval_limit")
    common.require(args.lora_r > 0 or (args.lora_r == 0 and args.student_quantization == "none"),
                   f"--lora-r {args.lora_r}: a rank, or 0: full fine-tuning (not of a 4-bit one)")
    out = Path(args.out)
    for flag, name in (("--teacher", args.teacher), ("--student", args.student)):
        common.require(not name.startswith("toy-"), f"{flag} {name}: the toy critics are "
                       "demonstration scorers for rl_nft.py and gcr_loop.py, not VLMs: they cannot "
                       "be PARROT's teacher or student")
    common.require(args.student != "toy", "--student toy: the toy is a demonstration teacher; "
                   "the student is a VLM (e.g. tiny-random)")
    common.require(args.teacher != "toy" or (args.dataset == "demo" and not args.teacher_api_base),
                   "--teacher toy judges the demo pairs from their pixels, here: use --dataset "
                   "demo and no --teacher-api-base")
    common.require(0 <= args.toy_failure_rate <= 1, "--toy-failure-rate is a share in [0, 1]")
    common.check_device(args.device)
    rr.use_prompts_dir(args.prompts_dir, ("anchored_pairwise", "consistency", "projection",
                                          "pointwise", "pairwise"))
    tiny = ["qwen3vl"] if "tiny-random" in (args.student, args.teacher) else []
    args.device = common.init_distributed(args.device, tiny)  # several processes: the README
    common.require(common.WORLD == 1 or args.phases == "3", "several processes run Phase 3 (the "
                   "SFT) only: run --phases 12 in one process first (a served teacher, "
                   "--teacher-api-base, is how the teacher uses many GPUs)")
    preflight(args, out)
    for phase, keys in BOUND_BY.items():  # what the phases wrote binds the settings it came from
        if (out / phase).is_file():
            common.check_same_run(out, args, keys, paths=("data_dir", "hf_dataset", "prompts_dir"))
    common.start_run(out, args)
    import torch
    torch.manual_seed(args.seed)
    run_parrot(LazyTeacher(args), out, args)
    return 0

def cli() -> None:
    """The `parrot` command (pyproject.toml)."""
    common.run(main)


if __name__ == "__main__":
    cli()
