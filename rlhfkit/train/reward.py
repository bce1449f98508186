"""Reward-model training (Bradley–Terry): ``rlhfkit reward train``.

Reads top to bottom: the config, the loss of one micro-batch, held-out accuracy, then ``train(cfg)``
whose loop is numbered phases. The data (records, the prompt split, packed rows) is
``rlhfkit.train.reward_data``; the machinery shared with SFT and DPO (step counts, global batches,
accumulation, the end-of-step tail) is ``rlhfkit.train.offline``; the full evaluation report (ECE,
per-category accuracy, length correlation) is ``rlhfkit.evaluate.reward_model``. docs/reward.md.

Batch vocabulary (shared with sft.py): ``batch_size`` *pairs* per optimizer step across all
processes; each process takes ``batch_size / processes`` of them and runs them ``micro_batch_size``
pairs (at most) per forward pass.

Loss normalisation: a pair mean over the *whole global batch*. Each micro-batch's summed loss is
divided by ``batch_size``, so 1 x 8 accumulation equals 8 x 1 and two processes equal one.

Layout: one row per prompt, ``[prompt ; reply 1 ; ... ; reply n]`` (``reward_data.collate``): the
prompt is computed once, and a reply that appears in several pairs is computed once (InstructGPT §3.5).
With ``group_by_prompt`` the epoch order keeps a prompt's pairs together so that this sharing happens.
Rows are cut into micro-batches by length (the optimizer step sums over the whole global batch, so
which pairs share a micro-batch does not change it) to keep padding small.

Read-out and probe (docs/reward.md, issue 18): a new RM reads ``pooling``/``layers`` (default: the mean
over the reply's tokens of the layers the probe's cross-validation picks), stored in its checkpoint. With ``probe`` the head is
first fitted as a regularised Bradley–Terry probe on the starting body's features
(``rlhfkit.train.reward_probe``): with ``freeze_backbone`` that is the whole training (no SGD steps);
otherwise fine-tuning starts from it (LP-FT).

After training, the head is normalised on the starting policy's completions (N details #4): by
default the training pairs' completions, which is what the policy that produced them samples.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from rlhfkit.config import CommonConfig
from rlhfkit.data.records import DataError
from rlhfkit.losses.reward import bradley_terry_loss
from rlhfkit.models import lora
from rlhfkit.models.heads import PackedScorer, RewardModel, reward_head
from rlhfkit.models.loading import disable_dropout, load_tokenizer
from rlhfkit.models.readout import (
    POOLINGS,
    READOUT_KEY,
    candidate_layers,
    check_layers_spec,
    unread_parameters,
)
from rlhfkit.train import offline, runtime
from rlhfkit.train.reward_data import (
    EncodedPair,
    collate,
    encode,
    make_units,
    micro_batches,
    normalisation_set,
    read_preferences,
    split_by_prompt,
)
from rlhfkit.train.reward_probe import fit_head

TIES = ("half", "drop")
REPORT_FILE = "reward_eval.json"


@dataclass
class RewardConfig(CommonConfig):
    data: str | None = None
    """Preference records (any format `load_preferences` reads: rlhfkit, TRL, HH, UltraFeedback), e.g. the
    output of `rlhfkit label` or of `rlhfkit annotate export`. Required."""
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
    """Train only the reward head: a linear probe of the frozen model's read-out. For small preference
    sets (a few hundred pairs), where fine-tuning the whole model fits the training pairs and not the
    task (docs/reward.md). With `probe` (the default) the head is fitted in closed form, no epochs;
    with probe=False it is trained by AdamW (lr ~1e-3, several epochs)."""
    pooling: str = "mean"
    """Read-out pooling of a new RM: 'mean' over the reply's tokens (EOS included) or 'last' (the reply's
    EOS, what RMs before issue 18 read). Frozen SmolLM2-135M, the demo's 288 pairs, probe: mean-pooled
    layers 8-24 0.59 / 0.67 accuracy vs gold (concise / sentiment) against 0.55 / 0.51 for last/last
    (docs/reward.md). A resumed checkpoint keeps its own."""
    layers: str = "auto"
    """Hidden states the head reads, averaged: 'last' (the final, normed layer), 'A-B' (transformers'
    hidden_states[A..B], 0 = the embeddings), 'N', 'middle' = blocks ceil(L/4)..floor(4L/5) (8-24 of 30), or
    'auto': the probe picks one of readout.candidate_layers (8-24, 4-16, 12-20, 1-30, 30-30 of 30) by its
    prompt-grouped cross-validation on the training pairs, one extraction pass for all; without the probe
    'auto' is 'middle'. The resolved range is stored in the checkpoint (docs/reward.md)."""
    probe: bool = True
    """Fit the head as an L2-regularised Bradley–Terry probe on the starting body's features (one
    no-grad pass over the training pairs; λ by prompt-grouped cross-validation) before any gradient step.
    With freeze_backbone that is the whole training; otherwise fine-tuning starts from it (LP-FT,
    Kumar et al. 2022). Ignored when resuming. False: a random head (N details #3), as before."""
    probe_folds: int = 5
    """Prompt-grouped cross-validation folds for the probe's λ (grid reward_probe.L2_GRID, 1e-3..1e2)."""
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
        offline.check_offline_config(self)
        if self.ties not in TIES:
            raise ValueError(f"ties must be 'half' or 'drop', got {self.ties!r}")
        offline.check_at_least(self, 0, "margin_scale")
        offline.check_at_least(self, 1, "max_length", "norm_samples", "eval_batch_size")
        offline.check_at_least(self, 2, "probe_folds")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        check_layers_spec(self.layers)
        if self.probe and self.freeze_backbone and self.margin_scale > 0:
            raise ValueError("margin_scale > 0 needs gradient training: the probe (probe=True with freeze_backbone) "
                             "fits plain Bradley–Terry; set probe=False or margin_scale=0")


# --- loss and held-out accuracy -----------------------------------------------------------------------


def pair_loss(scorer, batch: dict) -> tuple[torch.Tensor, dict]:
    """Bradley–Terry loss of one micro-batch (mean over its pairs) and its metrics."""
    r = scorer(batch["input_ids"], batch["attention_mask"], batch["position_ids"], batch["read_at"],
               batch["reply_start"])  # (R, N)
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


# --- training --------------------------------------------------------------------------------------


def start_layers(cfg: RewardConfig) -> str:
    """The read-out a new RM starts with: ``cfg.layers``, or for 'auto' the first candidate ('middle'),
    which the probe then replaces by its choice (without the probe it stays; a resumed checkpoint keeps
    its own)."""
    return "middle" if cfg.layers == "auto" else cfg.layers


def load_reward_model(cfg: RewardConfig, ckpt):
    """(model, tokenizer): the checkpoint's when resuming (with its read-out), else the starting model
    with a fresh head and the configured read-out."""
    from transformers import AutoModelForSequenceClassification

    if not ckpt:
        rm = RewardModel.init_from(cfg.model, seed=cfg.seed, pooling=cfg.pooling, layers=start_layers(cfg))
        return (lora.apply_lora_as(rm.model, cfg, "reward") if cfg.lora_r else rm.model), rm.tok  # docs/lora.md
    if lora.is_adapter_dir(ckpt):  # a LoRA RM's checkpoint: its start rebuilt, then its adapter and read-out
        rm = RewardModel.init_from(cfg.model, seed=lora.read_base(ckpt)["seed"], pooling=cfg.pooling,
                                   layers=start_layers(cfg))
        lora.restore_config(rm.model, ckpt)
        return lora.load_adapter(rm.model, ckpt), rm.tok
    model = AutoModelForSequenceClassification.from_pretrained(ckpt)
    tok = load_tokenizer(str(ckpt))
    model.config.pad_token_id = tok.pad_token_id
    disable_dropout(model)
    return model, tok


def train(cfg: RewardConfig, report: Callable[..., dict] | None = None) -> dict:
    """Train, normalise and save a reward model. ``report(rm, held-out records, batch_size=...)``, when
    given, is written to the run's reward_eval.json at the end: ``rlhfkit reward train`` passes
    ``rlhfkit.evaluate.reward_model.reward_model_report`` (the evaluation layer, which this one does not
    import)."""
    if cfg.data is None:
        raise DataError("reward training needs data: --data PREFS (e.g. the output of `rlhfkit label`)")

    # 1. runtime: accelerator, per-process seed, model (a fresh head, or the checkpoint's)
    acc = runtime.make_accelerator(cfg.mixed_precision)
    runtime.seed_everything(cfg.seed + acc.process_index)
    ckpt = runtime.find_checkpoint(cfg.resume, cfg.output_dir)
    model, tok = load_reward_model(cfg, ckpt)
    model.config.use_cache = False

    # 2. data: validate, split held-out prompts, tokenize, fix the step count
    records = read_preferences(cfg.data)
    if cfg.eval_data:
        train_records, eval_records = records, read_preferences(cfg.eval_data)
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
    probe_only = cfg.probe and cfg.freeze_backbone and not ckpt  # the probe is the whole fit: no SGD steps
    # (a probe-only run still plans the schedule, for the optimizer state its checkpoint carries)
    steps = offline.plan(max(len(data), cfg.batch_size) if probe_only else len(data), cfg, acc.num_processes,
                         "training pairs", micro_batch_size=None)
    groups = [p.prompt_key for p in data] if cfg.group_by_prompt else None

    # 3. the head: a probe on the starting body's features (every process fits the same one), then the
    # optimizer and schedule (on the head alone with freeze_backbone), resumed state, run directory
    scorer = PackedScorer(model)
    probe_metrics = {}
    if cfg.probe and not ckpt:
        candidates = candidate_layers(model.config.num_hidden_layers) if cfg.layers == "auto" else None
        probe_metrics = fit_head(scorer.to(acc.device), data, tok.pad_token_id, cfg.eval_batch_size, acc.device,
                                 cfg.probe_folds, cfg.seed, candidates)
    # which parameters train is known once the read-out is (layers 'auto': after the probe chose it)
    for p in unread_parameters(model):  # above the read-out's layers: no gradient reaches them
        p.requires_grad_(False)
    if cfg.freeze_backbone:
        head = reward_head(model)
        for p in model.parameters():
            p.requires_grad_(False)
        head.requires_grad_(True)
    scorer, opt, sched, step = offline.start_optimizer(scorer, cfg, acc, steps, ckpt,
                                                       params=[p for p in scorer.parameters() if p.requires_grad])
    run = runtime.open_run(cfg, "reward", acc, 0 if probe_only else steps.total)
    run.advance(step)
    result: dict = {"run_dir": str(run.path), "train_pairs": len(data), "eval_pairs": len(eval_set),
                    "readout": dict(getattr(model.config, READOUT_KEY, None) or {})}
    if probe_metrics:
        result["probe"] = {k.removeprefix("probe/"): v for k, v in probe_metrics.items() if k != "probe/cv"}
    if probe_only:  # the fit is the run: one metrics row, at step 0
        metrics = {k: v for k, v in probe_metrics.items()
                   if k not in ("probe/cv", "probe/layers", "probe/layers_cv") and v is not None}
        if eval_set:
            metrics.update(eval_pairs(scorer, eval_set, cfg, tok.pad_token_id, acc))
            result["eval_accuracy"] = metrics["eval/accuracy"]
        run.log(0, metrics)
        result["loss"] = metrics["loss/reward"]
    train_seconds, pairs_done = 0.0, 0

    # ALGO LOGIC: one micro-batch's summed Bradley–Terry loss, and the sums its metrics need
    def micro_loss(units) -> tuple[torch.Tensor, torch.Tensor]:
        batch = collate(units, tok.pad_token_id, acc.device)
        loss, m = pair_loss(scorer, batch)  # mean over the micro-batch's m pairs
        decided = float((~batch["tie_mask"]).sum())
        sums = torch.tensor([loss.item() * batch["num_pairs"], m["reward/accuracy"].item() * decided, decided,
                             m["reward/margin"].item() * batch["num_pairs"], batch["num_tokens"]], device=acc.device)
        return loss * batch["num_pairs"], sums

    while not probe_only and step < steps.last:
        gbatch = [data[j] for j in steps.global_batch(step, len(data), cfg.seed, groups)]
        local = steps.local(gbatch, acc.process_index)
        # 4. rows (a prompt with its distinct replies) cut into micro-batches of similar length
        micros = micro_batches(make_units(local, cfg.group_by_prompt), cfg.micro_batch_size)
        # 5. forward/backward over micro-batches (syncing gradients on the last), clip, step
        with runtime.Timer() as t:
            parts, grad_norm = offline.optimizer_step(scorer, opt, sched, acc, micros, micro_loss, cfg.batch_size,
                                                      cfg.grad_clip)
        step += 1
        train_seconds += t.seconds
        pairs_done += cfg.batch_size
        # 6. metrics: sums over micro-batches and processes / global counts
        local_sums = sum(parts)  # this process's loss sum, correct, decided, margin sum, tokens
        tokens = int(local_sums[4])
        sums = acc.reduce(local_sums[:4], "sum")
        metrics = {"loss/reward": (sums[0] / cfg.batch_size).item(),
                   "reward/accuracy": (sums[1] / sums[2].clamp(min=1)).item(),
                   "reward/margin": (sums[3] / cfg.batch_size).item(),
                   "perf/pairs_per_s": cfg.batch_size / max(t.seconds, 1e-9),
                   **runtime.perf_metrics(tokens * acc.num_processes, t.seconds, acc)}
        # 7. eval, log, checkpoint (the last one after normalisation, below)
        offline.end_of_step(
            run, step, metrics, steps, cfg, sched, grad_norm,
            evaluate=(lambda: eval_pairs(scorer, eval_set, cfg, tok.pad_token_id, acc)) if eval_set else None,
            save=lambda: runtime.save_checkpoint(acc, run, step, {"policy": acc.unwrap_model(scorer).model}, tok,
                                                 opt, sched, {}),
            save_last=False)
        if "eval/accuracy" in metrics:
            result["eval_accuracy"] = metrics["eval/accuracy"]
        result["loss"] = metrics["loss/reward"]
    result.update(steps=step, train_seconds=train_seconds,
                  pairs_per_s=pairs_done / train_seconds if train_seconds else None)

    # 8. normalise on the starting policy's completions (every process computes the same constants)
    rm = RewardModel(acc.unwrap_model(scorer).model, tok)
    finished = probe_only or step == steps.total
    if finished:
        prompts, completions = normalisation_set(cfg.norm_data, train_records, cfg.norm_samples, cfg.seed)
        mean, std = rm.fit_normalization(prompts, completions, batch_size=cfg.eval_batch_size)
        result["norm"] = {"mean": mean, "std": std, "n": len(completions)}
    result["checkpoint"] = str(runtime.save_checkpoint(acc, run, step, {"policy": rm.model}, tok, opt, sched, {}))

    # 9. the evaluation report on the held-out pairs: reward_eval.json
    if report is not None and eval_records and finished and acc.is_main_process:
        evaluation = report(rm, [r for _, r in eval_records], batch_size=cfg.eval_batch_size)
        run.write_json(REPORT_FILE, evaluation)
        result["eval"] = {k: evaluation[k] for k in ("accuracy", "ece", "length_spearman", "label_gold_agreement",
                                                     "gold_accuracy", "best_of_k", "accuracy_ci", "gold_accuracy_ci",
                                                     "label_gold_agreement_ci", "too_uncertain") if k in evaluation}
    run.close()
    return result
