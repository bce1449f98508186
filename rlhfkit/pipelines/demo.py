"""``rlhfkit demo``: the whole RLHF loop on the bundled SmolLM2-135M-Instruct, on a CPU, offline.

Phases (each leaves its output in the run directory; ``--resume DIR`` skips the finished ones and
resumes a training phase from its last checkpoint)::

    1 sample   comparison pairs from the starting model on a built-in task's train prompts
    2 label    simulated annotator: the task's hidden gold reward + Bradley-Terry noise + 25% flips
    3 reward   a reward model on the labels (a probe of the frozen model's mean-pooled layers, the range by CV);
               held-out accuracy vs labels and vs gold with CIs, the label ceiling, best-of-K
    4 train    each method in --methods against the reward model (DPO trains on the labels directly)
    5 eval     each trained policy vs the starting model on held-out prompts, judged by the gold reward
    6 report   runs/demo-<time>/report.html and a summary table

The summary shows the measured gold gain with its 95% CI whatever it is, and says so when the proxy
(reward-model) score rose while the gold score did not. The command line is ``rlhfkit/cli/demo.py``.
"""

from __future__ import annotations

import json
import sys
import time
import unicodedata
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from rlhfkit.data.io import load_pairs, save_pairs
from rlhfkit.data.tasks import get_task
from rlhfkit.evaluate.policy import eval_policy
from rlhfkit.evaluate.report import write_report
from rlhfkit.evaluate.reward_model import reward_model_report
from rlhfkit.evaluate.winrate import format_table
from rlhfkit.feedback.labeling import annotator_table, label_pairs, write_labels
from rlhfkit.rollout.engine import SamplingConfig
from rlhfkit.rollout.sample import sample_pairs, select_prompts
from rlhfkit.tracking import read_eval, write_json
from rlhfkit.train import cmpo, dpo, grpo, ppo
from rlhfkit.train.reward import RewardConfig
from rlhfkit.train.reward import train as train_rm

METHODS = ("ppo", "grpo", "rloo", "dpo", "cmpo")
ONLINE = {"ppo": (ppo.PPOConfig, ppo.train), "grpo": (grpo.GRPOConfig, grpo.train),
          "rloo": (grpo.RLOOConfig, grpo.train), "cmpo": (cmpo.CMPOConfig, cmpo.train)}
"""The RL methods: config class and train function (DPO trains offline, on the labels)."""


@dataclass
class DemoOptions:
    """What ``rlhfkit demo`` was asked for; saved in state.json so ``--resume`` continues alike."""

    task: str = "concise"
    """Built-in task with a hidden gold reward (`rlhfkit tasks`)."""
    methods: str = "grpo"
    """Comma list of METHODS."""
    quick: bool = False
    """Small sizes (<= 3 min), e.g. for CI."""
    model: str = "smollm2-135m-instruct"
    """Starting policy."""
    lr: float = 2e-5
    """Learning rate of the RL methods."""
    rollout_backend: str = "auto"
    """Generation backend of the RL methods (docs/generation.md): 'auto' is the int8 engine on a CPU."""
    seed: int = 0
    """Seeds sampling, labelling, every training run and the evaluation."""

    def method_list(self) -> list[str]:
        """The methods, checked: an unknown one is a ``ValueError`` naming it."""
        methods = [m.strip() for m in self.methods.split(",") if m.strip()]
        for m in methods:
            if m not in METHODS:
                raise ValueError(f"--methods: unknown method '{m}'; choose from {', '.join(METHODS)}")
        return methods

    @classmethod
    def saved(cls, state: dict) -> DemoOptions:
        """The options a run started with (state.json's ``args``)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in state.get("args", {}).items() if k in names})


@dataclass
class DemoSize:
    """Sizes of each phase; 'full' targets <= 10 min and 'quick' <= 3 min on a 2-core CPU."""

    pair_prompts: int
    pair_k: int
    """Samples per prompt: all C(K, 2) pairs of a prompt's samples are labelled."""
    pair_tokens: int
    rl_steps: int
    rl_prompts_per_step: int
    """Prompts per RL step: GRPO/RLOO/CMPO sample ``rl_group`` replies of each, PPO one."""
    rl_group: int
    rl_tokens: int
    rl_minutes: float | None
    """Wall-clock budget of each RL run: it stops after the step that passes it (the LR schedule still
    follows rl_steps), so a slower machine shortens training rather than the 10-minute promise."""
    eval_prompts: int
    eval_tokens: int


SIZES = {
    "full": DemoSize(pair_prompts=48, pair_k=4, pair_tokens=40, rl_steps=40, rl_prompts_per_step=2, rl_group=4,
                     rl_tokens=40, rl_minutes=5.5, eval_prompts=64, eval_tokens=40),
    "quick": DemoSize(pair_prompts=16, pair_k=2, pair_tokens=24, rl_steps=2, rl_prompts_per_step=2, rl_group=2,
                      rl_tokens=24, rl_minutes=None, eval_prompts=12, eval_tokens=24),
}
RM_SETTINGS = dict(freeze_backbone=True, probe=True, pooling="mean", layers="auto")
"""The reward model is a probe of the frozen model (features once, an L2 Bradley–Terry fit): a few
hundred pairs are far too few to fine-tune 135M parameters, and the mean over the reply of the middle
layers predicts gold far better than the last token of the last layer (0.49-0.55 -> ~0.65, docs/reward.md);
which range of layers is chosen by the probe's cross-validation on the training pairs (``layers='auto'``)."""


class Phases:
    """Which phases are done, persisted in state.json so an interrupted demo resumes."""

    def __init__(self, root: Path):
        self.path = root / "state.json"
        self.state = json.loads(self.path.read_text()) if self.path.exists() else {"done": [], "results": {}}

    def done(self, name: str) -> bool:
        return name in self.state["done"]

    def finish(self, name: str, result=None, seconds: float | None = None) -> None:
        self.state["done"].append(name)
        if seconds is not None:
            self.state.setdefault("phase_seconds", {})[name] = round(seconds, 1)
        if result is not None:
            self.state["results"][name] = result
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state, indent=2, default=str))
        tmp.replace(self.path)

    def result(self, name: str):
        return self.state["results"].get(name)


def train_method(method: str, root: Path, args: DemoOptions, size: DemoSize, rm_path: str, prefs: Path) -> str:
    """Train one method; returns its final checkpoint directory."""
    out = root / method
    # a checkpoint every third of the run to resume from (each one writes the weights and AdamW's moments:
    # 1.6 GB for the bundled model, ~4 s here); a run under 3 steps (--quick) saves only at its end
    common = dict(model=args.model, output_dir=str(out), seed=args.seed, resume="auto",
                  save_every=size.rl_steps // 3 or None, keep_checkpoints=1)
    if method == "dpo":
        cfg = dpo.DPOConfig(**common, data=str(prefs), epochs=1.0, batch_size=8, micro_batch_size=4, lr=5e-6, beta=0.1)
        return dpo.train(cfg)["checkpoint"]
    config_cls, train = ONLINE[method]
    k = 1 if method == "ppo" else size.rl_group
    cfg = config_cls(
        **common, task=args.task, reward=f"rm:{rm_path}", total_steps=size.rl_steps,
        prompts_per_step=size.rl_prompts_per_step * (size.rl_group if k == 1 else 1),
        samples_per_prompt=k, max_new_tokens=size.rl_tokens, lr=args.lr, micro_batch_size=8,
        rollout_backend=args.rollout_backend, max_minutes=size.rl_minutes,
        # the eval phase judges every method on the same held-out prompts; no eval hook inside training
        eval_every=0,
        # most replies run past the demo's short token budget: penalising every one of them alike
        # would leave no signal; a truncated reply is scored by the reward model where it stops
        missing_eos_penalty=None,
        # a run this short spends half its steps at under half the rate with a decaying schedule
        lr_schedule="constant",
    )
    if method == "ppo":  # one PPO epoch over one mini-batch: what a 10-minute CPU budget allows
        cfg.epochs_per_step, cfg.mini_batch_size = 1, None
    return train(cfg)["checkpoint"]


def summarise(evals: dict[str, dict], rm: dict | None) -> tuple[str, list[str]]:
    """The console table (gold before and after, the gain, win rate, proxy gain, KL) and the honest-reading
    sentences."""
    lines = [f"{'method':<7} {'gold start':<11} {'gold after':<11} {'gold gain [95% CI]':<26} "
             f"{'win rate vs start [95% CI]':<28} {'proxy gain':<11} {'KL':<6}"]
    notes = []
    for method, e in evals.items():
        gold = e.get("gold") or {}
        g, w = gold.get("difference") or {}, e.get("win_rate") or {}
        p = (e.get("proxy") or {}).get("difference") or {}
        kl = (e.get("kl") or {}).get("value")
        lines.append(f"{method:<7} {num(gold.get('reference')):<11} {num(gold.get('policy')):<11} "
                     f"{with_ci(g, '+.3f'):<26} {with_ci(w, '.1%'):<28} {num(p, '+.3f'):<11} "
                     f"{'n/a' if kl is None else format(kl, '.2f'):<6}")
        if g.get("ci_low") is not None:
            if g["ci_low"] > 0:
                notes.append(f"{method}: the gold reward on held-out prompts improved (its 95% CI excludes 0).")
            elif g["ci_high"] < 0:
                notes.append(f"{method}: gold reward got WORSE than the starting model (CI below 0).")
            else:
                notes.append(f"{method}: no significant gold gain (the CI includes 0).")
            if p.get("ci_low") is not None and p["ci_low"] > 0 and g["ci_low"] <= 0:
                notes.append(f"{method}: the proxy (reward-model) score rose while gold did not: the policy "
                             "optimised the reward model's errors (overoptimization), not the task.")
    notes += reward_model_notes(rm or {})
    return "\n".join(lines), notes


def num(block: dict | None, spec: str = ".3f") -> str:
    return "n/a" if not block or block.get("value") is None else format(block["value"], spec)


def with_ci(block: dict, spec: str) -> str:
    if block.get("value") is None:
        return "n/a"
    if block.get("ci_low") is None:
        return format(block["value"], spec)
    return f"{block['value']:{spec}} [{block['ci_low']:{spec}}, {block['ci_high']:{spec}}]"


def printable(text: str, limit: int = 240) -> str:
    """Model text for a terminal: one line, control and format characters (ANSI escapes, bidi overrides,
    carriage returns) shown as escapes so a reply cannot move the cursor or restyle the screen, cut at
    ``limit`` characters."""
    out = []
    for ch in text[:limit]:
        if ch == "\n":
            out.append("\\n")
        elif ch == "\\":
            out.append("\\\\")
        elif unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"):
            out.append(f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return "".join(out) + ("..." if len(text) > limit else "")


def examples(evals: dict[str, dict], n: int = 2) -> list[str]:
    """The first ``n`` held-out prompts of the evaluation (in order, not picked by outcome): the starting
    model's reply and each method's, with their gold scores, escaped."""
    lines = []
    first = next((e for e in evals.values() if e.get("samples")), None)
    for i in range(min(n, len(first["samples"]) if first else 0)):
        ref = first["samples"][i]
        lines.append(f"prompt {i + 1}: {printable(ref['prompt'])}")
        lines.append(f"  start  (gold {ref.get('gold_reference', float('nan')):.2f}): {printable(ref['reference'])}")
        for method, e in evals.items():
            if len(e.get("samples") or []) > i:
                s = e["samples"][i]
                lines.append(f"  {method:<6} (gold {s.get('gold_policy', float('nan')):.2f}): {printable(s['policy'])}")
    return lines


def reward_model_notes(rm: dict) -> list[str]:
    """The RM's held-out result: accuracy vs labels and vs gold (95% CIs), the ceiling, best-of-K, and
    whether the held-out pairs are enough to tell (docs/reward.md)."""
    if rm.get("accuracy") is None:
        return []
    ci = lambda c, f=".3f": "" if not c or c.get("ci_low") is None else f" [{c['ci_low']:{f}}, {c['ci_high']:{f}}]"  # noqa: E731
    ceiling, gold = rm.get("ceiling"), rm.get("gold_accuracy_ci") or {}
    notes = [f"reward model held-out accuracy: {rm['accuracy']:.3f}{ci(rm.get('accuracy_ci'))} against the noisy labels"
             + (f"; vs gold {gold['value']:.3f}{ci(gold)}, against a ceiling of {ceiling:.3f} (the labels' own "
                "agreement with gold)" if gold.get("value") is not None and ceiling is not None else "")]
    bok = rm.get("best_of_k") or {}
    if bok.get("gain"):
        notes.append(f"reward model best-of-{bok['k']} on held-out prompts: gold {bok['gain']['value']:+.3f}"
                     f"{ci(bok['gain'], '+.3f')} over the mean of the {bok['k']} (an oracle picking by gold: "
                     f"{bok['oracle_gain']['value']:+.3f})")
    if rm.get("too_uncertain"):
        notes.append(f"the held-out pairs are too few to pin the RM down ({', '.join(rm['too_uncertain'])}: 95% CI "
                     "wider than ±0.05); docs/reward.md measures this RM on hundreds of pairs")
    elif gold.get("ci_low") is not None and gold["ci_low"] <= 0.5:
        notes.append("the reward model is not distinguishable from chance vs gold on unseen prompts: the policy "
                     "has little signal to learn from (sample more pairs: docs/reward.md)")
    return notes


def run(options: DemoOptions, root: Path, resume: bool = False) -> int:
    """Run (or, with ``resume``, continue with its saved options) the demo in ``root``; prints the
    summary. Returns 0, or 130 after Ctrl-C (the run directory can then be resumed)."""
    root.mkdir(parents=True, exist_ok=True)
    phases = Phases(root)
    if resume:  # continue with the settings the run started with
        options = DemoOptions.saved(phases.state)
    else:
        phases.state["args"] = asdict(options)
    methods = options.method_list()
    size = SIZES["quick" if options.quick else "full"]
    t0 = time.time()
    try:
        run_phases(options, size, methods, root, phases)
    except KeyboardInterrupt:
        print(f"\ninterrupted; continue with: rlhfkit demo --resume {root}", file=sys.stderr)
        return 130
    evals = {m: read_eval(root / m) for m in methods}
    table, notes = summarise(evals, phases.result("reward"))
    n_eval = next((e["n_prompts"] for e in evals.values() if e), 0)
    print(f"\n== rlhfkit demo: task '{options.task}', {time.time() - t0:.0f} s this session ==")
    print(f"gold reward of each trained policy and of the starting model on {n_eval} held-out prompts "
          "(paired bootstrap 95% CIs; the gold reward is hidden from training)")
    print(table)
    for n in notes:
        print("- " + n)
    ex = examples(evals)
    if ex:
        print("examples (the first held-out prompts, not picked by outcome; model text escaped):")
        print("\n".join("  " + line for line in ex))
    others = ",".join(m for m in ("grpo", "dpo", "ppo") if m not in methods)
    print(f"next: `rlhfkit demo --methods {','.join(methods)},{others}` compares methods; `rlhfkit grpo --prompts "
          "FILE --reward fn:FILE.py:NAME` trains on your own prompts and reward (docs/rewards.md)")
    print(f"report: {root / 'report.html'}")
    return 0


def run_phases(args: DemoOptions, size: DemoSize, methods: list[str], root: Path, phases: Phases) -> None:
    from tqdm.auto import tqdm

    pairs, prefs = root / "pairs.jsonl", root / "prefs.jsonl"
    steps = ["sample", "label", "reward"] + [f"train:{m}" for m in methods] + [f"eval:{m}" for m in methods] + ["report"]
    bar = tqdm(total=len(steps), desc="demo", unit="phase", file=sys.stderr, dynamic_ncols=True)
    bar.update(sum(phases.done(s) for s in steps))

    def phase(name, fn):
        if not phases.done(name):
            bar.set_description(f"demo: {name}")
            t = time.perf_counter()
            result = fn()
            phases.finish(name, result, seconds=time.perf_counter() - t)
            bar.update()

    def sample():
        rows = select_prompts(task=args.task, num_prompts=size.pair_prompts, seed=args.seed)
        made, summary = sample_pairs(args.model, rows, task=args.task, split="train", k=size.pair_k, seed=args.seed,
                                     sampling=SamplingConfig(temperature=1.0, max_new_tokens=size.pair_tokens),
                                     backend=args.rollout_backend)
        save_pairs(pairs, made)
        print(json.dumps({"out": str(pairs), **summary}, indent=2))
        return summary

    def label():
        records, row = label_pairs(load_pairs(pairs), "simulated", source=str(pairs), seed=args.seed)
        report = write_labels(prefs, records, row, pairs_file=str(pairs), labeler="simulated")
        print(annotator_table([row]))
        print(json.dumps(report))
        return {"agreement": row["agreement"], "pairs": row["pairs"]}

    def reward():
        cfg = RewardConfig(model=args.model, data=str(prefs), output_dir=str(root / "rm"), **RM_SETTINGS,
                           batch_size=2 * size.pair_k * (size.pair_k - 1), micro_batch_size=24, seed=args.seed,
                           eval_fraction=0.2, keep_checkpoints=1)
        r = train_rm(cfg, report=reward_model_report)  # held-out accuracy, gold, ceiling, best-of-K: reward_eval.json
        ev = r.get("eval") or {}
        return {"checkpoint": r["checkpoint"], "accuracy": ev.get("accuracy"), "ceiling": ev.get("label_gold_agreement"),
                **{k: ev.get(k) for k in ("accuracy_ci", "gold_accuracy_ci", "best_of_k", "too_uncertain")},
                "fit_seconds": (r.get("probe") or {}).get("extract_seconds", 0) + (r.get("probe") or {}).get("fit_seconds", 0)}

    def eval_phase(method: str, ckpt: str):
        result = eval_policy(ckpt, get_task(args.task), reference=args.model, judge="gold", proxy=f"rm:{rm_path}",
                             num_prompts=size.eval_prompts, max_new_tokens=size.eval_tokens, seed=args.seed)
        out = write_json(root / method / "eval.json", result)
        print(format_table(result))
        print(f"wrote {out}")
        return 0

    phase("sample", sample)
    phase("label", label)
    phase("reward", reward)
    rm_path = phases.result("reward")["checkpoint"]
    for m in methods:
        phase(f"train:{m}", lambda m=m: {"checkpoint": train_method(m, root, args, size, rm_path, prefs)})
    for m in methods:
        ckpt = phases.result(f"train:{m}")["checkpoint"]
        phase(f"eval:{m}", lambda m=m, ckpt=ckpt: eval_phase(m, ckpt))
    phase("report", lambda: str(write_report([root / m for m in methods], root / "report.html",
                                             title=f"rlhfkit demo: {args.task}")))
    bar.close()
