"""Reward-model training (Bradley–Terry) and evaluation: ``rlhfkit reward train|eval``.

Reads top to bottom: the config, data preparation, ``train(cfg)`` whose loop is numbered phases,
then ``evaluate``. Runs under ``accelerate`` like every rlhfkit trainer.

Batch vocabulary (shared with sft.py): ``batch_size`` *pairs* per optimizer step across all
processes; each process takes ``batch_size / processes`` of them and runs them ``micro_batch_size``
pairs (at most) per forward pass.

Loss normalisation: a pair mean over the *whole global batch*. Each micro-batch's mean loss is
scaled by its share of the global batch (m / batch_size), so 1 x 8 accumulation equals 8 x 1 and two
processes equal one; DDP averages gradients over processes, hence the extra factor of processes.

Layout: one row per prompt, ``[prompt ; reply 1 ; ... ; reply n]``, with a mask that hides the
replies from each other (:func:`rlhfkit.models.batching.pack_groups`): the prompt is computed once, and
a reply that appears in several pairs (K samples per prompt give C(K, 2) pairs) is computed once
(InstructGPT §3.5). With ``group_by_prompt`` the epoch order keeps a prompt's pairs together so that
this sharing happens. Rows are cut into micro-batches by length (the optimizer step sums over the
whole global batch, so which pairs share a micro-batch does not change it) to keep padding small.

After training, the head is normalised on the starting policy's completions (N details #4): by
default the training pairs' completions, which is what the policy that produced them samples.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rlhfkit.config import CommonConfig
from rlhfkit.data.chat import tokenize_completion, tokenize_prompt
from rlhfkit.data.records import PreferenceRecord, Where
from rlhfkit.losses.reward import bradley_terry_loss
from rlhfkit.models.batching import pack_groups
from rlhfkit.models.heads import PackedScorer, RewardModel, reward_head
from rlhfkit.ops import exact_div
from rlhfkit.train import runtime


@dataclass
class RewardConfig(CommonConfig):
    data: str | None = None
    """Preference records (any format `load_preferences` reads: rlhfkit, TRL, HH, UltraFeedback), e.g. the
    output of `rlhfkit label`. Required."""
    eval_data: str | None = None
    """Held-out preference records; None: hold out eval_fraction of the prompts of `data`."""
    eval_fraction: float = 0.2
    """Fraction of *prompts* held out for evaluation when eval_data is None (all pairs of a prompt go to
    the same side, so held-out accuracy is on unseen prompts). 0 disables evaluation."""
    max_length: int = 512
    """Maximum tokens of prompt + one reply; longer replies are cut (and lose their EOS: a warning counts them)."""
    epochs: float = 1.0
    """Passes over the training pairs (ignored when max_steps is set). One epoch is the usual choice for
    reward models: they overfit after the first (InstructGPT §C.2; Stiennon et al. 2020 §D.2)."""
    batch_size: int = 32
    """Pairs per optimizer step, summed over processes and accumulation steps (InstructGPT used 64
    comparisons-groups; 32 suits the built-in tasks' ~1k pairs)."""
    micro_batch_size: int = 8
    """At most this many pairs per forward pass per process (a prompt's pairs are not split across passes);
    the accumulation steps are as many as the local batch needs."""
    group_by_prompt: bool = True
    """Keep each prompt's pairs together in the epoch order and score each distinct reply once per
    forward pass (one row [prompt ; reply 1 ; ... ; reply n]); K samples per prompt give C(K, 2) pairs
    from K reply passes. False: pairs shuffled individually, one row per pair."""
    lr: float = 2e-5
    """AdamW peak learning rate (1e-5..5e-5 for full fine-tuning of a 0.1-1B model; ~1e-3 for the tiny test
    model or with freeze_backbone)."""
    freeze_backbone: bool = False
    """Train only the reward head: a linear probe of the frozen model's last-token features. For small
    preference sets (a few hundred pairs), where fine-tuning the whole model fits the training pairs and
    not the task (docs/reward.md); use lr ~1e-3 and several epochs. Also much cheaper per step."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    warmup_ratio: float = 0.03
    """Fraction of steps with linear warmup."""
    lr_schedule: str = "cosine"
    """Decay after warmup: cosine, linear (both to 0) or constant."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 disables)."""
    margin_scale: float = 0.0
    """Margin m = margin_scale x strength for records with a `strength` (Llama 2 §3.2.2, eq. 2: the
    reward gap must exceed a margin that grows with how strong the preference was). 0 = plain BT."""
    ties: str = "half"
    """Tie records: 'half' = Bradley–Terry with target probability ½ (pulls the two scores together),
    'drop' = leave them out."""
    norm_data: str | None = None
    """Completions of the starting policy for normalisation: a pairs or preference file; None = the
    training pairs' completions (both sides)."""
    norm_samples: int = 1024
    """At most this many distinct completions (a seeded subset) are scored for normalisation."""
    eval_every: int = 50
    """Held-out accuracy every this many steps (and at the end)."""
    eval_batch_size: int = 16
    """Pairs per forward pass in evaluation and sequences per pass in normalisation."""
    stop_at_step: int | None = None
    """Stop (saving a checkpoint) at this step without changing the LR schedule: splits one run into parts.
    A run stopped early is not normalised; the resumed run normalises at its end."""

    def validate(self) -> None:
        super().validate()
        if self.ties not in ("half", "drop"):
            raise ValueError(f"ties must be 'half' or 'drop', got {self.ties!r}")
        if self.margin_scale < 0:
            raise ValueError(f"margin_scale must be >= 0, got {self.margin_scale}")
        if not 0 <= self.eval_fraction < 1:
            raise ValueError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")


# --- data -------------------------------------------------------------------------------------------


@dataclass
class EncodedPair:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    tie: bool
    margin: float
    record: PreferenceRecord
    prompt_key: str
    """The prompt as canonical JSON: pairs with the same key share a prompt (and maybe replies)."""


def load_records(source: str) -> list[tuple[Where, PreferenceRecord]]:
    """Preference records with where each came from; a pair whose two replies are the same text is an
    error (it teaches nothing, and usually means a broken export)."""
    from rlhfkit.data.formats import to_preference
    from rlhfkit.data.io import read_rows

    out = []
    for where, row in read_rows(source):
        rec = to_preference(row, where)
        if rec.chosen["content"] == rec.rejected["content"]:
            raise where.error("chosen and rejected are the same text; a comparison needs two different replies",
                              "rejected")
        out.append((where, rec))
    if not out:
        raise ValueError(f"{source}: no preference records")
    return out


def encode(records: list[tuple[Where, PreferenceRecord]], tok, max_length: int, margin_scale: float,
           ties: str) -> tuple[list[EncodedPair], int]:
    """Token ids per pair (prompt once, both replies ending with EOS); returns (pairs, replies cut)."""
    out, cut = [], 0
    prompt_cache: dict[str, list[int]] = {}
    for where, rec in records:
        if rec.tie and ties == "drop":
            continue
        key = json.dumps(rec.prompt, sort_keys=True)
        if key not in prompt_cache:
            prompt_cache[key] = tokenize_prompt(tok, rec.prompt, max_length - 1, where or Where())
        p = prompt_cache[key]
        reply = []
        for side in (rec.chosen, rec.rejected):
            ids = tokenize_completion(tok, rec.prompt, side["content"])
            if len(p) + len(ids) > max_length:
                ids, cut = ids[:max_length - len(p)], cut + 1
            reply.append(ids)
        margin = margin_scale * rec.strength if (rec.strength is not None and not rec.tie) else 0.0
        out.append(EncodedPair(p, reply[0], reply[1], rec.tie, margin, rec, key))
    return out, cut


def split_by_prompt(records: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, eval): a seeded ``fraction`` of distinct prompts, with all their pairs, goes to eval."""
    keys = sorted({json.dumps(r.prompt, sort_keys=True) for _, r in records})
    n_eval = int(round(len(keys) * fraction))
    held = set(np.random.default_rng(seed).permutation(len(keys))[:n_eval].tolist())
    held_keys = {keys[i] for i in held}
    train = [x for x in records if json.dumps(x[1].prompt, sort_keys=True) not in held_keys]
    evals = [x for x in records if json.dumps(x[1].prompt, sort_keys=True) in held_keys]
    return train, evals


def global_batches(data: list[EncodedPair], batch_size: int, seed: int, epoch: int, group_by_prompt: bool
                   ) -> list[np.ndarray]:
    """The epoch's pair order, cut into global batches of ``batch_size`` pairs (incomplete tail dropped).

    ``group_by_prompt``: the prompts are shuffled and each prompt's pairs kept together, so the
    C(K, 2) pairs of a prompt's K samples mostly land in one batch and share one forward pass
    (InstructGPT §3.5 trains on a prompt's comparisons together; shuffled, single comparisons made its
    reward model overfit within an epoch). Otherwise pairs are shuffled individually.
    """
    rng = np.random.default_rng([seed, epoch])
    if group_by_prompt:
        groups: dict[str, list[int]] = {}
        for i, p in enumerate(data):
            groups.setdefault(p.prompt_key, []).append(i)
        keys = list(groups)
        order = np.array([i for g in rng.permutation(len(keys)) for i in groups[keys[g]]], dtype=np.int64)
    else:
        order = rng.permutation(len(data))
    return [order[i:i + batch_size] for i in range(0, len(data) - batch_size + 1, batch_size)]


@dataclass
class Unit:
    """One packed row: a prompt, its distinct replies, and the pairs (index of chosen, of rejected) among them."""

    prompt_ids: list[int]
    replies: list[list[int]]
    pairs: list[tuple[int, int]]
    ties: list[bool]
    margins: list[float]

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + sum(len(r) for r in self.replies)


def make_units(pairs: list[EncodedPair], share: bool = True) -> list[Unit]:
    """Pairs → rows. ``share``: pairs of one prompt share a row and every distinct reply appears once
    in it; else one row [prompt ; chosen ; rejected] per pair."""
    units: dict = {}
    for n, p in enumerate(pairs):
        u = units.setdefault(p.prompt_key if share else n, (Unit(p.prompt_ids, [], [], [], []), {}))
        unit, index = u
        ids = []
        for reply in (p.chosen_ids, p.rejected_ids):
            key = tuple(reply)
            if key not in index or not share:
                index[key] = len(unit.replies)
                unit.replies.append(reply)
            ids.append(index[key])
        unit.pairs.append((ids[0], ids[1]))
        unit.ties.append(p.tie)
        unit.margins.append(p.margin)
    return [u for u, _ in units.values()]


def micro_batches(units: list[Unit], micro_batch_size: int) -> list[list[Unit]]:
    """Rows sorted by length (less padding), cut into micro-batches of at most ``micro_batch_size``
    pairs; a row is never split, so a prompt with more pairs than that is a micro-batch of its own.
    The optimizer step sums over the whole local batch, so how rows are grouped does not change it."""
    out: list[list[Unit]] = []
    n = 0
    for u in sorted(units, key=lambda u: u.length):
        if out and n + len(u.pairs) <= micro_batch_size:
            out[-1].append(u)
            n += len(u.pairs)
        else:
            out.append([u])
            n = len(u.pairs)
    return out


def collate(units: list[Unit], pad_id: int, device) -> dict:
    b = pack_groups([u.prompt_ids for u in units], [u.replies for u in units], pad_id)
    rows = [r for r, u in enumerate(units) for _ in u.pairs]
    b["pair_row"] = torch.tensor(rows, dtype=torch.long)
    b["pair_chosen"] = torch.tensor([c for u in units for c, _ in u.pairs], dtype=torch.long)
    b["pair_rejected"] = torch.tensor([r for u in units for _, r in u.pairs], dtype=torch.long)
    b["tie_mask"] = torch.tensor([t for u in units for t in u.ties], dtype=torch.bool)
    b["margin"] = torch.tensor([m for u in units for m in u.margins], dtype=torch.float32)
    b["num_pairs"] = len(rows)
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in b.items()}


def pair_loss(scorer, batch: dict) -> tuple[torch.Tensor, dict]:
    """Bradley–Terry loss of one micro-batch (mean over its pairs) and its metrics."""
    r = scorer(batch["input_ids"], batch["attention_mask"], batch["position_ids"], batch["read_at"])  # (R, N)
    chosen = r[batch["pair_row"], batch["pair_chosen"]]  # (m,)
    rejected = r[batch["pair_row"], batch["pair_rejected"]]  # (m,)
    margin = batch["margin"] if bool(batch["margin"].any()) else None
    return bradley_terry_loss(chosen, rejected, margin=margin, tie_mask=batch["tie_mask"])


@torch.no_grad()
def eval_pairs(scorer, data: list[EncodedPair], cfg: RewardConfig, pad_id: int, acc) -> dict:
    """Held-out BT loss and accuracy (non-tie pairs), summed over processes."""
    was_training = scorer.training
    scorer.eval()
    sums = torch.zeros(3, device=acc.device)  # loss sum, correct, decided
    shard = data[acc.process_index::acc.num_processes]
    for micro in micro_batches(make_units(shard, cfg.group_by_prompt), cfg.eval_batch_size):
        batch = collate(micro, pad_id, acc.device)
        loss, m = pair_loss(scorer, batch)
        decided = float((~batch["tie_mask"]).sum())
        sums += torch.tensor([loss.item() * batch["num_pairs"], m["reward/accuracy"].item() * decided, decided],
                             device=acc.device)
    sums = acc.reduce(sums, "sum")
    scorer.train(was_training)
    return {"eval/loss": (sums[0] / max(len(data), 1)).item(), "eval/accuracy": (sums[1] / sums[2].clamp(min=1)).item()}


def normalisation_set(cfg: RewardConfig, train_records: list) -> tuple[list[list[dict]], list[str]]:
    """Distinct (prompt, completion) pairs of the starting policy, a seeded subset of norm_samples."""
    if cfg.norm_data:
        from rlhfkit.data.io import read_rows

        rows = []
        for where, row in read_rows(cfg.norm_data):
            if "a" in row and "b" in row:
                from rlhfkit.data.formats import to_pair

                pr = to_pair(row, where)
                rows += [(pr.prompt, pr.a["content"]), (pr.prompt, pr.b["content"])]
            else:
                from rlhfkit.data.formats import to_preference

                rec = to_preference(row, where)
                rows += [(rec.prompt, rec.chosen["content"]), (rec.prompt, rec.rejected["content"])]
    else:
        rows = [(r.prompt, side["content"]) for _, r in train_records for side in (r.chosen, r.rejected)]
    uniq = list({(json.dumps(p, sort_keys=True), c): (p, c) for p, c in rows}.values())
    if len(uniq) > cfg.norm_samples:
        keep = np.random.default_rng(cfg.seed).choice(len(uniq), cfg.norm_samples, replace=False)
        uniq = [uniq[i] for i in sorted(keep.tolist())]
    return [p for p, _ in uniq], [c for _, c in uniq]


def train(cfg: RewardConfig) -> dict:
    from transformers import AutoModelForSequenceClassification

    from rlhfkit.models.loading import disable_dropout, load_tokenizer

    if cfg.data is None:
        raise ValueError("reward training needs data: --data PREFS (e.g. the output of `rlhfkit label`)")

    # 1. runtime: accelerator, per-process seed, model (a fresh head, or the checkpoint's)
    acc = runtime.make_accelerator(cfg.mixed_precision)
    runtime.seed_everything(cfg.seed + acc.process_index)
    ckpt = runtime.find_checkpoint(cfg.resume, cfg.output_dir)
    if ckpt:
        model = AutoModelForSequenceClassification.from_pretrained(ckpt)
        tok = load_tokenizer(str(ckpt))
        model.config.pad_token_id = tok.pad_token_id
        disable_dropout(model)
    else:
        rm = RewardModel.init_from(cfg.model, seed=cfg.seed)
        model, tok = rm.model, rm.tok
    model.config.use_cache = False
    if cfg.freeze_backbone:
        head = reward_head(model)
        for p in model.parameters():
            p.requires_grad_(False)
        head.requires_grad_(True)

    # 2. data: validate, split held-out prompts, tokenize, fix the step count
    records = load_records(cfg.data)
    if cfg.eval_data:
        train_records, eval_records = records, load_records(cfg.eval_data)
    elif cfg.eval_fraction > 0:
        train_records, eval_records = split_by_prompt(records, cfg.eval_fraction, cfg.seed)
    else:
        train_records, eval_records = records, []
    data, cut = encode(train_records, tok, cfg.max_length, cfg.margin_scale, cfg.ties)
    eval_set, eval_cut = encode(eval_records, tok, cfg.max_length, cfg.margin_scale, cfg.ties)
    if cut + eval_cut:
        warnings.warn(f"{cut + eval_cut} replies were longer than max_length={cfg.max_length} with their prompt and "
                      "were cut (the reward is then read before their EOS); raise max_length to keep them whole",
                      stacklevel=2)
    local_bs = exact_div(cfg.batch_size, acc.num_processes, "batch_size / processes")
    steps_per_epoch = len(data) // cfg.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"{cfg.data}: {len(data)} training pairs, fewer than one batch of {cfg.batch_size}")
    total_steps = cfg.max_steps or math.ceil(cfg.epochs * steps_per_epoch)

    # 3. optimizer and schedule
    scorer = PackedScorer(model)
    opt = runtime.adamw([p for p in scorer.parameters() if p.requires_grad], acc, cfg.lr, cfg.adam_eps,
                        cfg.weight_decay)
    sched = runtime.make_scheduler(opt, cfg.lr_schedule, int(cfg.warmup_ratio * total_steps), total_steps)
    scorer, opt = acc.prepare(scorer, opt)
    step, _ = runtime.restore(ckpt, opt, sched, acc.process_index)
    run = runtime.open_run(cfg, "reward", acc, total_steps)
    run.advance(step)
    scorer.train()
    last_stop = min(total_steps, cfg.stop_at_step or total_steps)
    result: dict = {"run_dir": str(run.path), "train_pairs": len(data), "eval_pairs": len(eval_set)}
    train_seconds, pairs_done = 0.0, 0

    while step < last_stop:
        epoch, i = divmod(step, steps_per_epoch)
        gbatch = [data[j] for j in global_batches(data, cfg.batch_size, cfg.seed, epoch, cfg.group_by_prompt)[i]]
        local = gbatch[acc.process_index * local_bs:(acc.process_index + 1) * local_bs]
        # 4. rows (a prompt with its distinct replies) cut into micro-batches of similar length
        micros = micro_batches(make_units(local, cfg.group_by_prompt), cfg.micro_batch_size)
        with runtime.Timer() as t:
            # 5. forward/backward; each micro-batch's pair mean weighted by its share of the global batch
            sums = torch.zeros(4, device=acc.device)  # loss sum, correct, decided, margin sum
            tokens = 0
            for k, micro in enumerate(micros):
                batch = collate(micro, tok.pad_token_id, acc.device)
                tokens += batch["num_tokens"]
                m_pairs = batch["num_pairs"]
                ctx = acc.no_sync(scorer) if k < len(micros) - 1 else contextlib.nullcontext()
                with ctx:
                    loss, m = pair_loss(scorer, batch)
                    # DDP averages gradients over processes; multiply back so the result is sum/batch_size
                    acc.backward(loss * m_pairs / cfg.batch_size * acc.num_processes)
                decided = float((~batch["tie_mask"]).sum())
                sums += torch.tensor([loss.item() * m_pairs, m["reward/accuracy"].item() * decided, decided,
                                      m["reward/margin"].item() * m_pairs], device=acc.device)
            # 6. clip and step
            grad_norm = acc.clip_grad_norm_(scorer.parameters(), cfg.grad_clip) if cfg.grad_clip > 0 else None
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
        step += 1
        train_seconds += t.seconds
        pairs_done += cfg.batch_size
        # 7. log: sums over processes / global counts
        sums = acc.reduce(sums, "sum")
        metrics = {"loss/reward": (sums[0] / cfg.batch_size).item(),
                   "reward/accuracy": (sums[1] / sums[2].clamp(min=1)).item(),
                   "reward/margin": (sums[3] / cfg.batch_size).item(),
                   "optim/lr": sched.get_last_lr()[0], "train/epoch": step / steps_per_epoch,
                   "perf/pairs_per_s": cfg.batch_size / max(t.seconds, 1e-9),
                   **runtime.perf_metrics(tokens * acc.num_processes, t.seconds, acc)}
        if grad_norm is not None:
            metrics["optim/grad_norm"] = float(grad_norm)
        if eval_set and (step % cfg.eval_every == 0 or step == total_steps):
            metrics.update(eval_pairs(scorer, eval_set, cfg, tok.pad_token_id, acc))
            result["eval_accuracy"] = metrics["eval/accuracy"]
        if step % cfg.log_every == 0 or step == last_stop:
            run.log(step, metrics)
        run.advance()
        result["loss"] = metrics["loss/reward"]
        # 8. checkpoint (the final one after normalisation, below)
        if cfg.save_every and step % cfg.save_every == 0 and step != last_stop:
            runtime.save_checkpoint(acc, run, step, {"policy": acc.unwrap_model(scorer).model}, tok, opt, sched, {})
    result.update(steps=step, train_seconds=train_seconds,
                  pairs_per_s=pairs_done / train_seconds if train_seconds else None)

    # 9. normalise on the starting policy's completions (every process computes the same constants)
    rm = RewardModel(acc.unwrap_model(scorer).model, tok)
    if step == total_steps:
        prompts, completions = normalisation_set(cfg, train_records)
        mean, std = rm.fit_normalization(prompts, completions, batch_size=cfg.eval_batch_size)
        result["norm"] = {"mean": mean, "std": std, "n": len(completions)}
    result["checkpoint"] = str(runtime.save_checkpoint(acc, run, step, {"policy": rm.model}, tok, opt, sched, {}))

    # 10. evaluate on the held-out pairs: reward_eval.json
    if eval_records and step == total_steps and acc.is_main_process:
        report = evaluate(rm, [r for _, r in eval_records], batch_size=cfg.eval_batch_size)
        run.write_json("reward_eval.json", report)
        result["eval"] = {k: report[k] for k in ("accuracy", "ece", "length_spearman", "label_gold_agreement",
                                                 "gold_accuracy") if k in report}
    run.close()
    return result


# --- evaluation -------------------------------------------------------------------------------------


def expected_calibration_error(p_chosen: np.ndarray, bins: int = 10) -> tuple[float, list[dict]]:
    """ECE of the Bradley–Terry probability that the labelled-chosen reply wins, p = σ(r_c - r_r).

    Each pair's confidence is max(p, 1 - p) and it is correct when p > ½; ECE = Σ_b (n_b / N)
    |accuracy_b - confidence_b| over ``bins`` equal-width confidence bins on [½, 1] (Guo et al. 2017, eq. 3).
    """
    conf = np.maximum(p_chosen, 1 - p_chosen)
    correct = (p_chosen > 0.5).astype(float)
    edges = np.linspace(0.5, 1.0, bins + 1)
    idx = np.clip(np.digitize(conf, edges[1:-1]), 0, bins - 1)
    ece, table = 0.0, []
    for b in range(bins):
        sel = idx == b
        if not sel.any():
            continue
        acc_b, conf_b = correct[sel].mean(), conf[sel].mean()
        ece += sel.mean() * abs(acc_b - conf_b)
        table.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "n": int(sel.sum()),
                      "accuracy": float(acc_b), "confidence": float(conf_b)})
    return float(ece), table


def evaluate(rm: RewardModel, records: list[PreferenceRecord], batch_size: int = 16) -> dict:
    """Accuracy (overall, per task, per prompt category), ECE of the BT probability, the correlation
    of the score with reply length, and — for simulated labels — accuracy against the gold order."""
    from scipy import stats

    prompts = [r.prompt for r in records]
    raw_c = rm.score(prompts, [r.chosen["content"] for r in records], batch_size=batch_size, normalized=False).numpy()
    raw_r = rm.score(prompts, [r.rejected["content"] for r in records], batch_size=batch_size, normalized=False).numpy()
    diff = raw_c - raw_r
    decided = np.array([not r.tie for r in records])
    correct = diff > 0
    out: dict = {"pairs": len(records), "ties": int((~decided).sum()), "decided": int(decided.sum()),
                 "accuracy": float(correct[decided].mean()) if decided.any() else None}
    for key in ("task", "category"):
        groups: dict = {}
        for i, r in enumerate(records):
            if decided[i]:
                groups.setdefault(str(r.metadata.get(key)), []).append(bool(correct[i]))
        if any(g != "None" for g in groups):
            out[f"by_{key}"] = {g: {"n": len(v), "accuracy": float(np.mean(v))} for g, v in sorted(groups.items())}
    if decided.any():
        out["ece"], out["calibration"] = expected_calibration_error(1 / (1 + np.exp(-diff[decided])))
    if (~decided).any():
        out["tie_mean_abs_diff"] = float(np.abs(diff[~decided]).mean())
    # length: every reply once, score (normalised when available) against its token count
    norm = rm.norm or (0.0, 1.0)
    scores = np.concatenate([raw_c, raw_r])
    lengths = np.array([len(rm.tok(r.chosen["content"], add_special_tokens=False)["input_ids"]) for r in records]
                       + [len(rm.tok(r.rejected["content"], add_special_tokens=False)["input_ids"]) for r in records])
    if len(set(lengths.tolist())) > 1 and np.ptp(scores) > 0:
        out["length_pearson"] = float(stats.pearsonr(scores, lengths)[0])
        out["length_spearman"] = float(stats.spearmanr(scores, lengths)[0])
    n = len(records)
    diff_len = lengths[:n] - lengths[n:]
    sel = decided & (diff_len != 0)
    if sel.any():
        out["rm_prefers_longer"] = float(((diff > 0) == (diff_len > 0))[sel].mean())
        out["labels_prefer_longer"] = float((diff_len > 0)[sel].mean())
    out["score_mean"] = float(((scores - norm[0]) / norm[1]).mean())
    out["score_std"] = float(((scores - norm[0]) / norm[1]).std())
    gold = [(r.metadata.get("gold_chosen"), r.metadata.get("gold_rejected")) for r in records]
    has_gold = np.array([a is not None and b is not None and a != b for a, b in gold])
    if has_gold.any():
        gold_c_wins = np.array([(a > b) if h else False for (a, b), h in zip(gold, has_gold)])
        out["gold_accuracy"] = float(((diff > 0) == gold_c_wins)[has_gold].mean())
        out["label_gold_agreement"] = float(gold_c_wins[has_gold & decided].mean()) if (has_gold & decided).any() else None
        out["gold_pairs"] = int(has_gold.sum())
    out["norm"] = rm.norm
    return out


def _run_dir_of(rm_path: str) -> Path:
    """``runs/X`` for ``runs/X/checkpoints/step-N``, else the RM directory itself."""
    p = Path(rm_path)
    return p.parent.parent if p.parent.name == "checkpoints" else p


def main(argv: list[str] | None = None) -> int:
    from rlhfkit.config import ConfigError, add_config_arguments, config_from_args

    argv = list(sys.argv[1:] if argv is None else argv)
    top = argparse.ArgumentParser(prog="rlhfkit reward", description="Train (Bradley–Terry) or evaluate a reward model.")
    top.add_argument("action", choices=["train", "eval"])
    if not argv or argv[0] in ("-h", "--help"):
        top.print_help()
        return 0
    args, rest = top.parse_known_args(argv[:1])
    rest = argv[1:]
    if args.action == "train":
        p = argparse.ArgumentParser(prog="rlhfkit reward train", description="Train a Bradley–Terry reward model on "
                                    "preference records; writes checkpoints/step-N/ and reward_eval.json.")
        add_config_arguments(p, RewardConfig)
        ns = p.parse_args(rest)
        try:
            cfg = config_from_args(RewardConfig, ns)
            if cfg.data is None:
                raise ConfigError("--data is required (preference records, e.g. the output of `rlhfkit label`)")
        except (ConfigError, ValueError) as e:
            p.error(str(e))
        result = train(cfg)
        print(json.dumps(result, indent=2, default=str))
        return 0
    p = argparse.ArgumentParser(prog="rlhfkit reward eval", description="Evaluate a reward model on preference records: "
                                "accuracy (overall, per task and category), calibration (ECE), length correlation.")
    p.add_argument("--rm", required=True, help="reward model directory (e.g. runs/X/checkpoints/step-N)")
    p.add_argument("--data", required=True, help="preference records to evaluate on")
    p.add_argument("--output-dir", help="where reward_eval.json goes (default: the RM's run directory)")
    p.add_argument("--batch-size", type=int, default=16)
    ns = p.parse_args(rest)
    try:
        rm = RewardModel.load(ns.rm)
        records = [r for _, r in load_records(ns.data)]
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"rlhfkit reward eval: {e}") from None
    report = {"rm": ns.rm, "data": ns.data, **evaluate(rm, records, batch_size=ns.batch_size)}
    out_dir = Path(ns.output_dir) if ns.output_dir else _run_dir_of(ns.rm)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "reward_eval.json").write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "calibration"}, indent=2))
    print(f"[rlhfkit] wrote {out_dir / 'reward_eval.json'}")
    return 0


__all__ = ["RewardConfig", "evaluate", "expected_calibration_error", "main", "train"]


if __name__ == "__main__":
    sys.exit(main())
