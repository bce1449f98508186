"""Iterative (online) DPO: rounds of sample pairs from the current policy -> label them -> train one
DPO round on them, the round's starting policy as its reference (e.g. Xiong et al. 2024, "Iterative
Preference Learning from Human Feedback"). docs/dpo.md, "Iterative DPO".

``rlhfkit dpo`` runs ``train`` here: offline DPO (``rlhfkit.train.dpo``) when no labeler is set, the
rounds when one is. The rounds are a pipeline (sampling from ``rollout``, labels from ``feedback``,
gold scores from ``evaluate``, each round trained by ``train.dpo``), so they live above those layers
and not inside the DPO trainer.
"""

from __future__ import annotations

import dataclasses
import gc
from dataclasses import dataclass
from pathlib import Path

from rlhfkit.data.io import save_preferences
from rlhfkit.data.tasks import Task, get_task
from rlhfkit.evaluate.gold import measure
from rlhfkit.feedback.simulated import SimulatedAnnotator
from rlhfkit.models import load_model
from rlhfkit.rollout.engine import Sampler, SamplingConfig
from rlhfkit.rollout.sample import make_pairs, pick
from rlhfkit.tracking import RunDir, default_run_dir
from rlhfkit.train import dpo
from rlhfkit.train.dpo import DPOConfig

LABELERS = ("simulated",)
# Seeds of a round's prompt subset and of its sampling batches: mixed with this prime so that rounds
# (and batches within a round) draw unrelated streams from one user seed.
SEED_PRIME = 1_000_003


@dataclass
class IterativeDPOConfig(DPOConfig):
    """DPOConfig plus the rounds; with labeler None it is plain offline DPO on ``data``."""

    rounds: int = 1
    """Iterative (online) DPO with a labeler: rounds of sample pairs from the current policy -> label -> train
    (the round's starting policy is its reference). Without a labeler: 1 (plain offline DPO on data)."""
    labeler: str | None = None
    """Labels each round's pairs: 'simulated' (the task's hidden gold reward with human-like noise,
    rlhfkit.feedback.SimulatedAnnotator). None: offline DPO on data."""
    task: str | None = None
    """With a labeler: the built-in task (rlhfkit.data.tasks) whose train prompts are sampled each round and
    whose gold reward labels the pairs and scores held-out samples (eval/gold per round)."""
    round_prompts: int = 64
    """With a labeler: train prompts sampled per round (a seeded subset, different each round)."""
    round_k: int = 2
    """With a labeler: completions sampled per prompt; every distinct pair of them is labelled (K(K-1)/2)."""
    round_temperature: float = 1.0
    """With a labeler: sampling temperature of the round's completions (> 0)."""
    round_max_new_tokens: int = 48
    """With a labeler: token cap of sampled completions (and of the held-out gold samples)."""
    gold_prompts: int = 32
    """With a labeler: held-out task prompts scored by the gold reward after each round (eval/gold)."""

    def validate(self) -> None:
        super().validate()
        if self.labeler is not None:
            if self.labeler not in LABELERS:
                raise ValueError(f"labeler must be 'simulated', got {self.labeler!r}; for a judge or reward model, "
                                 "run `rlhfkit sample`, `rlhfkit label` and `rlhfkit dpo --data` per round")
            if self.task is None:
                raise ValueError("labeler=simulated needs task: the built-in task whose prompts and gold reward to use")
            if self.data is not None:
                raise ValueError("with a labeler each round's pairs are sampled and labelled: leave data unset")
            if self.rounds < 1 or self.round_k < 2 or self.round_temperature <= 0:
                raise ValueError("rounds must be >= 1, round_k >= 2 and round_temperature > 0")
            if self.round_prompts < 1 or self.round_max_new_tokens < 1 or self.gold_prompts < 1:
                raise ValueError("round_prompts, round_max_new_tokens and gold_prompts must be >= 1")
        elif self.rounds != 1:
            raise ValueError("rounds > 1 needs a labeler for the new pairs (--labeler simulated --task NAME)")

    def offline(self, **changes) -> DPOConfig:
        """The DPO fields alone (what one offline run is given), with ``changes``."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(DPOConfig)}
        return DPOConfig(**{**fields, **changes})


def train(cfg: IterativeDPOConfig) -> dict:
    """``rlhfkit dpo``: the rounds with a labeler, else one offline DPO run on ``cfg.data``."""
    if cfg.labeler is None:
        return dpo.train(cfg.offline())
    return train_rounds(cfg)


def sample_labelled_pairs(model, tok, cfg: IterativeDPOConfig, task: Task, round_: int) -> list:
    """Sample ``round_k`` completions per prompt for a seeded subset of the task's train prompts from
    ``model``, pair them (``rollout.sample.make_pairs``) and label them with the simulated annotator."""
    rows = pick(task.prompt_rows("train"), cfg.round_prompts, cfg.seed * SEED_PRIME + round_)
    sampler = Sampler(model, tok, SamplingConfig(temperature=cfg.round_temperature,
                                                 max_new_tokens=cfg.round_max_new_tokens),
                      max_prompt_length=cfg.max_prompt_length)
    flat = [r for r in rows for _ in range(cfg.round_k)]
    texts, info = [], []
    for b in range(0, len(flat), cfg.inference_micro_batch_size):
        out = sampler.sample([r["messages"] for r in flat[b:b + cfg.inference_micro_batch_size]],
                             seed=(cfg.seed * SEED_PRIME + round_) * SEED_PRIME + b, with_logps=False)
        texts += out.completions
        info += [{"ended": bool(e)} for e in out.ended.tolist()]
    meta = {"seed": cfg.seed, "round": round_, "task": task.name}
    pairs = []
    for i, row in enumerate(rows):
        k = slice(i * cfg.round_k, (i + 1) * cfg.round_k)
        pairs += make_pairs(row, texts[k], info[k], meta, task.name)[0]
    return SimulatedAnnotator(task=task, seed=cfg.seed + round_).label(pairs)


def train_rounds(cfg: IterativeDPOConfig) -> dict:
    """Each round samples pairs from the current policy, labels them, and trains one DPO round on them
    with the round's starting policy as reference. ``eval/gold`` (the task's gold reward of samples on
    held-out prompts) is logged per round, round 0 being the starting model. One process; no resume."""
    task = get_task(cfg.task)
    root = Path(cfg.output_dir or default_run_dir("dpo-rounds"))
    run = RunDir(root, dataclasses.asdict(cfg), method="dpo-rounds", progress=False)
    print(f"[rlhfkit] dpo: {cfg.rounds} rounds on task {task.name}, run dir {root}", flush=True)
    policy, history, trained = cfg.model, [], {}
    for round_ in range(cfg.rounds + 1):
        # 1. score the policy after `round_` rounds on held-out prompts with the hidden gold reward
        model, tok = load_model(policy, seed=cfg.seed)
        model.eval()
        gold = measure(task, model, tok, num_prompts=cfg.gold_prompts, max_new_tokens=cfg.round_max_new_tokens,
                       batch_size=cfg.inference_micro_batch_size, seed=cfg.seed)
        history.append({"eval/gold": gold["gold_mean"], "eval/gold_sem": gold["gold_sem"], **trained,
                        "policy": policy})
        run.log(round_, history[-1])
        if round_ == cfg.rounds:
            break
        # 2. sample pairs from it and label them
        records = sample_labelled_pairs(model, tok, cfg, task, round_ + 1)
        del model
        gc.collect()
        data = root / f"round-{round_ + 1}" / "prefs.jsonl"
        data.parent.mkdir(parents=True, exist_ok=True)
        save_preferences(data, records)
        # 3. one round of DPO on them, the round's starting policy as reference
        result = dpo.train(cfg.offline(model=policy, reference_model=None, data=str(data),
                                       output_dir=str(data.parent / "train"), resume=None))
        policy = result["checkpoint"]
        trained = {"round/pairs": len(records), "round/ties": sum(r.tie for r in records),
                   "round/loss": result["loss/dpo"], "round/accuracy": result["rewards/accuracy"]}
    run.close()
    return {"run_dir": str(root), "rounds": cfg.rounds, "checkpoint": policy, "gold": [h["eval/gold"] for h in history],
            "history": history}
