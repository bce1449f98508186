"""Offline preference optimisation: DPO and its family (IPO, cDPO, SLiC hinge, SimPO, ORPO) and KTO.

Reads top to bottom: the config, log-probs and losses, the reference pre-pass, eval, then
``train(cfg)`` whose loop is numbered phases. Reading and tokenizing the data is
``rlhfkit.train.dpo_data``; the losses themselves are the pure functions of ``rlhfkit.losses.dpo``;
the machinery shared with SFT and the reward model (step counts, global batches, accumulation, the
end-of-step tail) is ``rlhfkit.train.offline``; iterative DPO (sample, label, train, repeat) is
``rlhfkit.pipelines.iterative_dpo``. docs/dpo.md gives every loss's equation and when to use it.

Efficiency by design (docs/dpo.md, "Efficiency"):

- the reference model is run ONCE over the dataset before the policy exists (``reference_logps``);
  its log-probs are kept in memory and in ``<run dir>/ref_logps.pt`` keyed by a hash of the data and
  the reference model, and the reference is deleted before training. Reference-free losses
  (simpo, orpo) never load one;
- chosen and rejected go through the policy in ONE forward pass, packed without padding, their shared
  prompt computed once (``rlhfkit.models.logps.completion_logps``), with logits on completion tokens only.

Batch vocabulary (as in SFT): ``batch_size`` examples per optimizer step across all processes =
``micro_batch_size`` x accumulation steps x processes. An example is a pair (two sequences) for the
pairwise losses and one labelled completion for KTO. The loss is the mean over the global batch:
each micro-batch's *summed* per-example loss is divided by ``batch_size``, so accumulation and data
parallelism do not change it.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rlhfkit.config import CommonConfig, check_choice
from rlhfkit.data.formats import PREFERENCE_FORMATS
from rlhfkit.data.records import DataError
from rlhfkit.losses.dpo import DPO_LOSSES, REFERENCE_FREE, PairLogps, kto_kl_estimate, kto_loss
from rlhfkit.models import load_model, load_tokenizer
from rlhfkit.models.batching import pad_completions
from rlhfkit.models.loading import TINY, resolve
from rlhfkit.models.logps import completion_logps
from rlhfkit.models.lora import is_adapter_dir, is_lora, load_policy, reference_model
from rlhfkit.ops import masked_sum
from rlhfkit.train import offline, runtime
from rlhfkit.train.dpo_data import Example, load_examples

LOSSES = (*DPO_LOSSES, "kto")
# packing (the config's word, shared with SFT) -> the log-prob layout of rlhfkit.models.logps
PACKINGS = {"padding_free": "shared", "padded": "padded"}
# Loss parameters and the one loss each applies to: setting one for another loss is an error, never ignored.
LOSS_PARAMS = {"label_smoothing": "robust", "gamma_beta_ratio": "simpo", "simpo_gamma": "simpo",
               "strength_margin": "sigmoid", "desirable_weight": "kto", "undesirable_weight": "kto"}
# ties='half' averages the loss over both orientations: meaningful where the loss is the likelihood of
# a preference probability (target 1/2) or IPO's regression (target h = 0). hinge only penalises
# margins beyond 1/beta (flat inside), orpo adds SFT on the chosen side, kto has no pairs.
TIE_LOSSES = ("sigmoid", "robust", "ipo", "simpo")
TIES = ("skip", "half")
LONG_PROMPTS = ("error", "skip")


@dataclass
class DPOConfig(CommonConfig):
    data: str | None = None
    """Training preferences (required): a JSONL/JSON/Parquet file, a save_to_disk folder or a hub id, in
    any format rlhfkit.data.formats reads (native PreferenceRecord, TRL, HH, UltraFeedback), e.g. the
    output of `rlhfkit label` or of `rlhfkit annotate export`. For loss=kto also unpaired rows {prompt, completion, label: true|false} (label may sit in metadata)."""
    data_format: str = "auto"
    """Preference format name of rlhfkit.data.formats.PREFERENCE_FORMATS, or 'auto' (detected per row)."""
    eval_data: str | None = None
    """Held-out preferences (same formats); None: hold out eval_fraction of data."""
    eval_fraction: float = 0.05
    """Fraction of data held out for eval metrics when eval_data is None (0 disables eval)."""
    reference_model: str | None = None
    """Frozen reference policy π_ref; None: the starting model (model), as in the DPO paper."""
    loss: str = "sigmoid"
    """sigmoid (DPO), ipo, robust (cDPO), hinge (SLiC), simpo, orpo (reference-free) or kto (unpaired)."""
    beta: float = 0.1
    """Inverse temperature β of the implicit reward β log(π/π_ref). Typical: DPO 0.01-0.5 (paper 0.1),
    IPO τ 0.01-1, SimPO 2-10, ORPO λ 0.05-1, KTO 0.1."""
    label_smoothing: float = 0.0
    """loss=robust only: probability ε in [0, 0.5) that a label is flipped (cDPO)."""
    gamma_beta_ratio: float = 0.5
    """loss=simpo only: target margin γ/β (paper 0.3-0.8)."""
    simpo_gamma: float | None = None
    """loss=simpo only: TRL's spelling (CPOConfig.simpo_gamma), the target margin γ itself rather than
    γ/β; when set, the loss uses gamma_beta_ratio = simpo_gamma / beta, so a TRL config means the same
    here (TRL simpo_gamma 0.5 with beta 2.0 = gamma_beta_ratio 0.25). Set one of the two, not both. None = unset."""
    desirable_weight: float = 1.0
    """loss=kto only: λ_D, weight of desirable examples (paper: λ_D n_D / (λ_U n_U) in [1, 4/3])."""
    undesirable_weight: float = 1.0
    """loss=kto only: λ_U, weight of undesirable examples."""
    ties: str = "skip"
    """Pairs marked tie: 'skip' (dropped at load) or 'half' (target 1/2: the loss averaged over both
    orientations; losses sigmoid, robust, ipo, simpo)."""
    strength_margin: float = 0.0
    """loss=sigmoid only: margin m = strength_margin x (strength - 1) inside the sigmoid for records with a
    preference strength (Llama 2 §3.2.2); records without one get m = 0. 0 disables."""
    max_prompt_length: int = 256
    """Maximum prompt tokens (chat template included); longer prompts follow long_prompts."""
    max_completion_length: int = 256
    """Maximum tokens per completion; longer ones are right-truncated (losing their EOS)."""
    long_prompts: str = "error"
    """A prompt over max_prompt_length: 'error' (naming the record) or 'skip' (dropped, counted in the log)."""
    epochs: float = 1.0
    """Passes over the data (ignored when max_steps is set). DPO usually trains 1-3 epochs."""
    batch_size: int = 32
    """Examples (pairs; KTO: completions) per optimizer step, summed over processes and accumulation steps."""
    micro_batch_size: int = 4
    """Examples per forward pass per process (a pair is two sequences in the same packed row);
    batch_size / (micro_batch_size x processes) = accumulation steps."""
    inference_micro_batch_size: int = 8
    """Examples per forward pass per process in the gradient-free passes (reference pre-pass, eval)."""
    packing: str = "padding_free"
    """'padding_free': a micro-batch is one row of concatenated sequences with position ids restarting
    per sequence; 'padded': one row per sequence, the micro-batches of a batch grouped by length."""
    lr: float = 1e-6
    """AdamW peak learning rate (DPO paper 1e-6 with batch 64; smaller models tolerate ~1e-5)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    warmup_ratio: float = 0.1
    """Fraction of steps with linear warmup (DPO paper: 150 warmup steps)."""
    lr_schedule: str = "linear"
    """Decay after warmup: cosine, linear (both to 0) or constant."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 disables)."""
    eval_every: int = 50
    """Compute eval metrics (and the KL estimate) every this many steps and at the end."""
    kl_prompts: int = 8
    """Held-out prompts sampled from the policy for eval/kl_ref (0 disables; needs an eval set and a
    reference-based loss). Each estimate loads the reference model for a moment."""
    kl_max_new_tokens: int = 32
    """Tokens sampled per prompt for eval/kl_ref (temperature 1, no top-k/top-p)."""
    stop_at_step: int | None = None
    """Stop (saving a checkpoint) at this step without changing the LR schedule: splits one run into parts."""

    def validate(self) -> None:
        super().validate()
        offline.check_offline_config(self)
        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}; choose one of {', '.join(LOSSES)}")
        for name, owner in LOSS_PARAMS.items():
            default = next(f.default for f in dataclasses.fields(self) if f.name == name)
            if getattr(self, name) != default and self.loss != owner:
                raise ValueError(f"{name} applies to loss={owner} only (loss is {self.loss}); leave it at {default}")
        if self.ties not in TIES:
            raise ValueError(f"ties must be 'skip' or 'half', got {self.ties!r}")
        if self.ties == "half" and self.loss not in TIE_LOSSES:
            raise ValueError(f"ties=half is not defined for loss={self.loss} (it is for {', '.join(TIE_LOSSES)}); "
                             "use ties=skip")
        check_choice(self, "data_format", ("auto", *PREFERENCE_FORMATS))
        check_choice(self, "long_prompts", LONG_PROMPTS)
        check_choice(self, "packing", tuple(PACKINGS))
        offline.check_positive(self, "beta", "desirable_weight", "undesirable_weight")
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing!r}")
        offline.check_at_least(self, 0, "gamma_beta_ratio", "simpo_gamma", "strength_margin", "kl_prompts")
        ratio_default = next(f.default for f in dataclasses.fields(self) if f.name == "gamma_beta_ratio")
        if self.simpo_gamma is not None and self.gamma_beta_ratio != ratio_default:
            raise ValueError(f"set simpo_gamma (TRL's margin γ) or gamma_beta_ratio (γ/β), not both; got "
                             f"simpo_gamma={self.simpo_gamma!r} and gamma_beta_ratio={self.gamma_beta_ratio!r}")
        offline.check_at_least(self, 1, "max_prompt_length", "max_completion_length", "inference_micro_batch_size",
                               "kl_max_new_tokens")

    def simpo_gamma_beta_ratio(self) -> float:
        """SimPO's γ/β: ``simpo_gamma / beta`` when TRL's spelling is set, else ``gamma_beta_ratio``."""
        return self.gamma_beta_ratio if self.simpo_gamma is None else self.simpo_gamma / self.beta


# --- log-probs and losses ---------------------------------------------------------------------------


def forward_examples(model, examples: list[Example], packing: str, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs and lengths of both completions of every example, in ONE forward pass.

    Returns ``logps`` (B, 2) float32 and ``lengths`` (B, 2) long; column 0 = ``first``, 1 = ``second``.
    The B first sequences and B second ones share the packed row (the prompt is computed twice).
    """
    prompts = [e.prompt_ids for e in examples]
    batch = pad_completions(prompts + prompts, [e.first_ids for e in examples] + [e.second_ids for e in examples],
                            pad_id)
    per_token = completion_logps(model, batch, layout=PACKINGS[packing])  # (2B, T)
    mask = batch.completion_mask.to(per_token.device)
    b = len(examples)
    logps = masked_sum(per_token, mask, dim=1)  # (2B,)
    lengths = mask.sum(1)
    return torch.stack([logps[:b], logps[b:]], 1), torch.stack([lengths[:b], lengths[b:]], 1)


def example_losses(cfg: DPOConfig, logps: torch.Tensor, ref: torch.Tensor | None, lengths: torch.Tensor,
                   examples: list[Example], z0: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """The configured loss per example (B,) and its metrics; ``logps``, ``ref``, ``lengths`` are (B, 2)
    as returned by ``forward_examples`` (``ref`` None for reference-free losses; ``z0`` for KTO)."""
    dev = logps.device
    ref = ref.to(dev) if ref is not None else None
    if cfg.loss == "kto":
        desirable = torch.tensor([e.desirable for e in examples], device=dev)
        return kto_loss(logps[:, 0], ref[:, 0], desirable, z0, cfg.beta, cfg.desirable_weight, cfg.undesirable_weight)
    fn = DPO_LOSSES[cfg.loss]
    params = {"robust": {"label_smoothing": cfg.label_smoothing}, "simpo": {"gamma_beta_ratio": cfg.simpo_gamma_beta_ratio()}
              }.get(cfg.loss, {})
    tie = torch.tensor([e.tie for e in examples], device=dev)
    margin = None
    if cfg.strength_margin:
        strength = torch.tensor([e.strength for e in examples], device=dev, dtype=logps.dtype)
        margin = torch.where(tie, torch.zeros((), device=dev), cfg.strength_margin * (strength - 1))

    def pairs(c: int, r: int) -> PairLogps:
        return PairLogps(logps[:, c], logps[:, r], None if ref is None else ref[:, c],
                         None if ref is None else ref[:, r], lengths[:, c], lengths[:, r])

    loss, metrics = fn(pairs(0, 1), cfg.beta, **params, **({"margin": margin} if margin is not None else {}))
    if bool(tie.any()):  # only with ties='half': target 1/2 = the mean of both orientations
        backward, _ = fn(pairs(1, 0), cfg.beta, **params)
        loss = torch.where(tie, 0.5 * (loss + backward), loss)
    return loss, metrics


def logps_table(model, examples: list[Example], cfg: DPOConfig, pad_id: int, acc) -> tuple[torch.Tensor, torch.Tensor]:
    """``forward_examples`` over a whole dataset without gradients, sharded over processes.

    Returns ``logps`` (N, 2) and ``lengths`` (N, 2) on the CPU, identical on every process.
    """
    from accelerate.utils import gather_object

    was_training = model.training
    model.eval()
    shard = list(range(acc.process_index, len(examples), acc.num_processes))
    shard.sort(key=lambda i: examples[i].num_tokens)  # length-grouped: little padding in 'padded' mode
    rows = []
    with torch.no_grad():
        for k in range(0, len(shard), cfg.inference_micro_batch_size):
            idx = shard[k:k + cfg.inference_micro_batch_size]
            logps, lengths = forward_examples(model, [examples[i] for i in idx], cfg.packing, pad_id)
            rows += [(i, lp, ln) for i, lp, ln in zip(idx, logps.cpu().tolist(), lengths.cpu().tolist())]
    if acc.num_processes > 1:
        rows = gather_object(rows)
    rows.sort(key=lambda r: r[0])
    model.train(was_training)
    return torch.tensor([r[1] for r in rows], dtype=torch.float32), torch.tensor([r[2] for r in rows])


# --- the reference pre-pass ------------------------------------------------------------------------


def load_reference(name: str, seed: int):
    """The frozen reference policy; the only place a reference model is loaded (tests patch it)."""
    model, tok = load_model(name, seed=seed)
    model.requires_grad_(False)
    return model.eval(), tok


def reference_key(name: str, seed: int, examples: list[Example], acc) -> str:
    """Hash of what the cached reference log-probs depend on: the reference model's identity (local
    files' names, sizes and modification times; 'tiny' with its seed; a hub id by name), the
    precision, and every example's token ids."""
    if name == TINY or name.startswith(TINY + ":"):
        ident: object = f"{name}:seed={seed}"
    elif Path(path := resolve(name)).is_dir():
        ident = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in Path(path).iterdir() if f.is_file())
    else:
        ident = name
    h = hashlib.sha256(json.dumps([ident, acc.mixed_precision, acc.device.type, 1]).encode())
    for e in examples:
        h.update(np.asarray([*e.prompt_ids, -1, *e.first_ids, -1, *e.second_ids, -2], dtype=np.int64).tobytes())
    return h.hexdigest()


def reference_logps(cfg: DPOConfig, examples: list[Example], run_path: Path, tok, acc, policy=None
                    ) -> tuple[torch.Tensor, str]:
    """(N, 2) reference log-probs of ``examples``: read from ``run_path/ref_logps.pt`` when its key
    matches, else computed once with the reference model, which is deleted before returning. ``policy``:
    a LoRA policy whose adapter-disabled self is the reference (the same weights as ``cfg.model``)."""
    name = cfg.reference_model or cfg.model
    key = reference_key(name, cfg.seed, examples, acc)
    cache = run_path / "ref_logps.pt"
    if cache.exists():
        saved = torch.load(cache, map_location="cpu", weights_only=True)
        if saved.get("key") == key:
            return saved["logps"], "cached"
    ref, ref_tok = (policy, tok) if policy is not None else load_reference(name, cfg.seed)
    if ref_tok.get_vocab() != tok.get_vocab():
        raise ValueError(f"reference_model {name!r} has a different tokenizer from the policy {cfg.model!r}; "
                         "DPO compares log-probs of the same token ids, so both must share one vocabulary")
    with reference_model(ref.to(acc.device)) as ref_model:  # LoRA: the policy with its adapter off
        logps, _ = logps_table(ref_model, examples, cfg, tok.pad_token_id, acc)
    del ref  # the reference never coexists with the policy's weights, gradients and optimizer state
    gc.collect()
    acc.wait_for_everyone()
    if acc.is_main_process:
        torch.save({"key": key, "logps": logps}, cache)
    return logps, "computed"


# --- eval ------------------------------------------------------------------------------------------


def eval_metrics(model, examples: list[Example], ref: torch.Tensor | None, cfg: DPOConfig, pad_id: int, acc) -> dict:
    """``eval/`` versions of the training metrics over the whole held-out set."""
    logps, lengths = logps_table(model, examples, cfg, pad_id, acc)
    z0 = kto_kl_estimate(logps[:, 1], ref[:, 1]) if cfg.loss == "kto" else None
    loss, metrics = example_losses(cfg, logps, ref, lengths, examples, z0)
    return {"eval/loss": loss.mean().item(), **{f"eval/{k}": float(v) for k, v in metrics.items()}}


@torch.no_grad()
def kl_to_reference(model, prompts: list[list[int]], cfg: DPOConfig, tok, acc, step: int) -> tuple[float, list[dict]]:
    """Sequence KL(π || π_ref) on held-out prompts: sample y ~ π, then mean of Σ_t log π - log π_ref
    (the unbiased "k1" estimator, http://joschu.net/blog/kl-approx.html). Also returns the samples."""
    policy = acc.unwrap_model(model)
    policy.eval()
    width = max(map(len, prompts))
    ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompts], device=acc.device)
    with torch.random.fork_rng(devices=[acc.device] if acc.device.type == "cuda" else []):
        torch.manual_seed(cfg.seed + step)  # the same draw on every process, and training RNG untouched
        out = policy.generate(ids, attention_mask=(ids != tok.pad_token_id).long(), do_sample=True, temperature=1.0,
                              top_k=0, top_p=1.0, max_new_tokens=cfg.kl_max_new_tokens, use_cache=True,
                              pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    completions = []
    for row in out[:, width:].tolist():  # tokens up to the first EOS are all sampled (pads only follow EOS)
        completions.append(row[:row.index(tok.eos_token_id) + 1] if tok.eos_token_id in row else row)
    batch = pad_completions(prompts, completions, tok.pad_token_id)
    logp = completion_logps(policy, batch, layout="shared")
    mask = batch.completion_mask.to(logp.device)
    lora = is_lora(policy) and not cfg.reference_model
    ref = policy if lora else load_reference(cfg.reference_model or cfg.model, cfg.seed)[0].to(acc.device)
    with reference_model(ref) as ref_model:  # LoRA: the policy itself with its adapter off, no second copy
        ref_logp = completion_logps(ref_model, batch, layout="shared")
    del ref
    gc.collect()
    kl = masked_sum(logp - ref_logp, mask, dim=1)  # (B,)
    policy.train()
    samples = [{"prompt": tok.decode(p), "completion": tok.decode(c), "kl": k} for p, c, k in
               zip(prompts, completions, kl.tolist())]
    return kl.mean().item(), samples


# --- training --------------------------------------------------------------------------------------


def train(cfg: DPOConfig) -> dict:
    if not cfg.data:
        # checked here, not in validate: a config without data is still a config (YAML bases, iterative
        # DPO's rounds, which fill it in); the CLI prints this without a traceback
        raise DataError("data is required: --data FILE.jsonl (or a Parquet file, save_to_disk folder, hub id)")
    # 1. runtime: accelerator, per-process seed, tokenizer (the models come after the data)
    acc = runtime.make_accelerator(cfg.mixed_precision)
    runtime.seed_everything(cfg.seed + acc.process_index)
    ckpt = runtime.find_checkpoint(cfg.resume, cfg.output_dir)
    tok = load_tokenizer(str(ckpt) if ckpt and not is_adapter_dir(ckpt) else cfg.model)

    # 2. data: tokenize, split off eval, fix the step count
    data, counts = load_examples(cfg.data, tok, cfg)
    if cfg.eval_data:
        eval_set, _ = load_examples(cfg.eval_data, tok, cfg)
    else:
        data, eval_set = offline.split_off_eval(data, cfg.eval_fraction, cfg.seed)
    steps = offline.plan(len(data), cfg, acc.num_processes, "training examples", cfg.micro_batch_size)
    run = runtime.open_run(cfg, "dpo", acc, steps.total)
    result = {"run_dir": str(run.path), **counts, "train_examples": len(data), "eval_examples": len(eval_set)}

    # 3. reference log-probs: once per dataset, before the policy exists; none for reference-free losses.
    # With LoRA the policy comes first: its adapter-disabled self is the reference (docs/lora.md)
    model = load_policy(cfg, ckpt)[0].to(acc.device) if cfg.lora_r and not cfg.reference_model else None
    ref = eval_ref = None
    if cfg.loss not in REFERENCE_FREE:
        with runtime.Timer() as t:
            ref, result["ref_logps"] = reference_logps(cfg, data + eval_set, run.path, tok, acc, policy=model)
        result["ref_pass_s"] = t.seconds
        ref, eval_ref = ref[:len(data)], ref[len(data):]
    kl_prompts = list({tuple(e.prompt_ids): None for e in eval_set})[:cfg.kl_prompts] if ref is not None else []

    # 4. policy, optimizer, schedule, resumed state
    if model is None:
        model, _ = load_policy(cfg, ckpt)
    model.config.use_cache = False
    runtime.sparse_tied_embedding_grad(model, acc)
    model, opt, sched, step = offline.start_optimizer(model, cfg, acc, steps, ckpt)
    run.advance(step)

    # ALGO LOGIC: one micro-batch's summed loss; chosen + rejected in one forward pass
    def micro_loss(idx: list[int]) -> tuple[torch.Tensor, dict]:
        micro = [data[j] for j in idx]
        logps, lengths = forward_examples(model, micro, cfg.packing, tok.pad_token_id)
        micro_ref = ref[idx] if ref is not None else None
        z0 = None
        if cfg.loss == "kto":  # z0 from this micro-batch's mismatched pairs on every process
            z0 = kto_kl_estimate(acc.gather(logps[:, 1].detach()), acc.gather(micro_ref[:, 1].to(acc.device)))
        loss, _ = example_losses(cfg, logps, micro_ref, lengths, micro, z0)
        seen = {"idx": torch.tensor(idx, device=acc.device), "logps": logps.detach(), "lengths": lengths,
                "loss": loss.detach(), "z0": z0}
        return loss.sum(), seen

    def evaluate() -> dict:
        """Held-out metrics, and the KL to the reference of fresh policy samples."""
        out = eval_metrics(model, eval_set, eval_ref, cfg, tok.pad_token_id, acc)
        if kl_prompts:
            out["eval/kl_ref"], samples = kl_to_reference(model, [list(p) for p in kl_prompts], cfg, tok, acc, step)
            run.log_samples(step, samples)
        return out

    while step < steps.last:
        local = steps.local(steps.global_batch(step, len(data), cfg.seed), acc.process_index).tolist()
        if cfg.packing == "padded":  # group by length: the sum over the batch does not depend on the order
            local.sort(key=lambda j: data[j].num_tokens)
        micros = [local[k:k + cfg.micro_batch_size] for k in range(0, len(local), cfg.micro_batch_size)]
        # 5. forward/backward over micro-batches (syncing gradients on the last), clip, step
        with runtime.Timer() as t:
            seen, grad_norm = offline.optimizer_step(model, opt, sched, acc, micros, micro_loss, cfg.batch_size,
                                                     cfg.grad_clip)
        step += 1
        # 6. metrics of the whole global batch, from the gathered per-example values
        gathered = {k: acc.gather(torch.cat([s[k] for s in seen])) for k in ("idx", "logps", "lengths", "loss")}
        order = gathered["idx"].cpu()
        batch = [data[j] for j in order.tolist()]
        z0 = torch.stack([s["z0"] for s in seen]).mean() if cfg.loss == "kto" else None
        _, metrics = example_losses(cfg, gathered["logps"], ref[order] if ref is not None else None,
                                    gathered["lengths"], batch, z0)
        metrics = {"loss/dpo": gathered["loss"].mean().item(), **{k: float(v) for k, v in metrics.items()},
                   **runtime.perf_metrics(sum(e.num_tokens for e in batch), t.seconds, acc),
                   "perf/examples_per_s": cfg.batch_size / max(t.seconds, 1e-9)}
        # 7. eval, log, checkpoint
        saved = offline.end_of_step(
            run, step, metrics, steps, cfg, sched, grad_norm, evaluate=evaluate if eval_set else None,
            save=lambda: runtime.save_checkpoint(acc, run, step, {"policy": model}, tok, opt, sched, {}))
        result.update({k: v for k, v in metrics.items() if not k.startswith(("perf/", "optim/", "train/"))})
        if saved is not None:
            result["checkpoint"] = str(saved)
    run.close()
    result["steps"] = step
    return result
