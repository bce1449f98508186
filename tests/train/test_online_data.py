"""Online RL on your own prompts and rewards (docs/rewards.md): prompt datasets with columns, TRL-style
reward functions (Python API and fn: specs), None scores excluded from the advantage, per-component
metrics, and the errors for bad input. Runs on the tiny model, a few steps each."""

from __future__ import annotations

import json

import pytest
import torch
from toy_rl import ToyTask

from rlhfkit.data.records import DataError


def common(**kw):
    base = dict(model="tiny:0.5", total_steps=2, prompts_per_step=2, samples_per_prompt=2, max_new_tokens=6,
                temperature=1.0, missing_eos_penalty=None, eval_every=2, eval_prompts=4, sample_every=0,
                lr=1e-2, progress=False)
    return {**base, **kw}


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in open(f"{run_dir}/metrics.jsonl")]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


PROMPTS = [{"prompt": f"Count to {i}.", "target": i, "id": f"p{i}"} for i in range(1, 13)]


def test_a_trl_reward_function_using_a_column_runs_unchanged_through_grpo_train(tmp_path):
    """TRL's documented shape: ``fn(completions, **kwargs)`` reading a dataset column; a list of dicts as
    the dataset. The function also checks that each completion's column value is its own prompt's
    (K = 2 copies per prompt, rows shuffled by the prompt stream)."""
    from rlhfkit.train.grpo import GRPOConfig, train

    calls = []

    def reward_len(completions, target, prompts, **kwargs):
        calls.append(len(completions))
        assert all(p == f"Count to {t}." for p, t in zip(prompts, target))   # columns stay with their prompts
        assert all(isinstance(c, str) for c in completions)                   # standard rows: plain strings
        return [-abs(t - len(c)) / 10 for c, t in zip(completions, target)]

    cfg = GRPOConfig(**common(output_dir=str(tmp_path / "run")))
    result = train(cfg, reward_fn=reward_len, prompts=PROMPTS)
    assert result["steps"] == 2 and calls[:3] == [2, 4, 4]     # eval (2 held-out prompts, K=1), 2 steps x 2 x K=2
    rows = metrics(tmp_path / "run")
    train_rows = [r for r in rows if "reward/mean" in r]
    assert {"reward/reward_len/mean", "reward/reward_len/none_frac", "reward/unscored_frac"} <= set(train_rows[-1])
    assert "reward/gold" not in train_rows[-1]                 # no task: no gold
    assert {"eval/reward", "eval/reward/reward_len/mean"} <= set(result["eval_start"]) and "eval/gold" not in result["eval_start"]


def test_fn_spec_by_module_path_and_by_file_path_give_the_same_run(tmp_path, monkeypatch):
    from rlhfkit.train.grpo import GRPOConfig, train

    code = "def score(prompts, completions, target, **kwargs):\n    return [float(len(c) % 3 == t % 3) for c, t in zip(completions, target)]\n"
    (tmp_path / "mod_rewards_x.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    data = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    runs = {}
    for name, spec in [("module", "fn:mod_rewards_x:score"), ("file", f"fn:{tmp_path}/mod_rewards_x.py:score@1")]:
        cfg = GRPOConfig(**common(reward=spec, prompts=str(data), output_dir=str(tmp_path / name)))
        train(cfg)
        runs[name] = [{k: v for k, v in r.items() if not k.startswith("perf/") and k != "time"} for r in metrics(tmp_path / name)]
    assert "reward/score/mean" in runs["module"][-1] and "eval/reward/score/mean" in runs["module"][-1]
    assert runs["module"] == runs["file"]


def test_prompts_from_a_file_give_the_same_run_as_the_same_prompts_from_a_task(tmp_path):
    """The toy task's train and held-out prompts written to JSONL files (``messages`` rows) and the
    same reward function: the same seed gives the same training metrics, and the eval's configured
    reward (eval/reward without a task, eval/proxy with one) agrees."""
    from rlhfkit.train.grpo import GRPOConfig, train

    def short(prompts, completions, **kwargs):
        return [1.0 / (1 + len(c[0]["content"])) for c in completions]   # conversational: message lists

    task = ToyTask()
    train_file = write_jsonl(tmp_path / "train.jsonl", [{"messages": p} for p in task.prompts("train")])
    held_file = write_jsonl(tmp_path / "held.jsonl", [{"messages": p} for p in task.prompts("heldout")])
    train(GRPOConfig(**common(output_dir=str(tmp_path / "task"))), reward_fn=short, task=task)
    train(GRPOConfig(**common(output_dir=str(tmp_path / "file"), prompts=str(train_file),
                              eval_prompts_data=str(held_file))), reward_fn=short)
    a, b = metrics(tmp_path / "task"), metrics(tmp_path / "file")
    assert len(a) == len(b) == 3
    for ra, rb in zip(a, b):
        for key, value in ra.items():
            if key == "time" or key.startswith(("perf/", "reward/gold", "eval/gold", "eval/win_rate")) or key == "eval/proxy":
                continue
            assert rb[key] == pytest.approx(value, abs=1e-6), key
        if "eval/proxy" in ra:
            assert rb["eval/reward"] == pytest.approx(ra["eval/proxy"], abs=1e-6)


# --- None: excluded from the advantage and the loss ----------------------------------------------------


def test_unscored_samples_take_their_groups_scored_mean_so_their_advantage_is_zero():
    """K = 4, groups [1, None, 3, None] and [None] x 4, [2, 2, 5, None].
    Fill: group 1's scored mean is (1 + 3)/2 = 2 -> [1, 2, 3, 2]; group 2 has none -> [0, 0, 0, 0];
    group 3: (2 + 2 + 5)/3 = 3 -> [2, 2, 5, 3].
    Dr. GRPO (r - mean over K): group 1 mean 2 -> [-1, 0, 1, 0], the baseline of the scored pair only;
    group 3 mean (2+2+5+3)/4 = 3 -> [-1, -1, 2, 0]. RLOO: K/(K-1) (r - mean) = 4/3 x the same (the
    scored-only RLOO would be n/(n-1) (r - mean): a per-group factor, docs/rewards.md)."""
    from rlhfkit.losses.advantages import group_advantages, leave_one_out_advantages
    from rlhfkit.train.online_rollout import fill_unscored

    nan = float("nan")
    raw = torch.tensor([1, nan, 3, nan, nan, nan, nan, nan, 2, 2, 5, nan])
    filled = fill_unscored(raw, ~raw.isnan(), 4)
    assert filled.tolist() == [1, 2, 3, 2, 0, 0, 0, 0, 2, 2, 5, 3]
    expected = torch.tensor([-1, 0, 1, 0, 0, 0, 0, 0, -1, -1, 2, 0], dtype=torch.float32)
    torch.testing.assert_close(group_advantages(filled, 4, scale=False), expected)
    torch.testing.assert_close(leave_one_out_advantages(filled, 4), expected * 4 / 3)
    assert group_advantages(filled, 4)[[1, 3, 4, 11]].abs().max() == 0      # GRPO: unscored rows get 0 too


def test_optimize_leaves_unscored_rows_out_of_the_loss():
    """The update with rows 1 and 6 unscored equals the update on the other six rows alone (SGD, no
    clipping: the update is proportional to the mean-over-scored-rows gradient)."""
    import copy

    from rlhfkit.models import load_model
    from rlhfkit.rollout.engine import Sampler
    from rlhfkit.train import grpo, online, runtime

    cfg = grpo.GRPOConfig(**common(max_new_tokens=4, beta=0.1, grad_clip=0.0, micro_batch_size=3))
    model, tok = load_model("tiny:0.5", seed=0)
    r = Sampler(model, tok, cfg.sampling(), layout=cfg.layout()).sample(
        [p for p in ToyTask().prompts("train")[:4] for _ in range(2)], seed=0)
    with torch.no_grad():
        r.ref_logps = cfg.logps(model, r)
    r.scores = torch.tensor([1.0, 0.0, 0.2, 0.9, 0.5, 0.5, 0.0, 0.7])
    adv = grpo.compute_advantages(r, cfg)
    acc = runtime.make_accelerator("no")
    keep = torch.tensor([0, 2, 3, 4, 5, 7])

    def step(batch, a):
        policy = copy.deepcopy(model).train()
        opt = torch.optim.SGD(policy.parameters(), lr=1.0)
        online.optimize([policy], opt, batch, a, lambda mb, x: grpo.policy_loss(policy, mb, x, cfg), cfg, acc, step=0)
        return [p.detach() - p0 for p, p0 in zip(policy.parameters(), model.parameters())]

    masked = r.select(torch.arange(8))
    masked.extras["scored"] = torch.tensor([True, False, True, True, True, True, False, True])
    with_mask, subset = step(masked, adv), step(r.select(keep), adv[keep])
    assert max(d.abs().max().item() for d in subset) > 1e-3
    for a, b in zip(with_mask, subset):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("method", ["grpo", "ppo"])
def test_a_reward_returning_none_trains_and_logs_the_none_fraction(tmp_path, method):
    from rlhfkit.train import grpo, ppo

    def odd_only(prompts, completions, target, **kwargs):
        return [1.0 / (1 + len(c)) if t % 2 else None for c, t in zip(completions, target)]

    cfg_cls, train = (grpo.GRPOConfig, grpo.train) if method == "grpo" else (ppo.PPOConfig, ppo.train)
    kw = {} if method == "grpo" else dict(samples_per_prompt=1, prompts_per_step=4, mini_batch_size=2)
    result = train(cfg_cls(**common(output_dir=str(tmp_path / method), **kw)), reward_fn=odd_only, prompts=PROMPTS)
    assert result["steps"] == 2
    rows = [r for r in metrics(tmp_path / method) if "reward/unscored_frac" in r]
    # one component: a sample is unscored exactly when it returned None; odd targets are half the prompts
    assert all(r["reward/unscored_frac"] == r["reward/odd_only/none_frac"] for r in rows)
    assert any(r["reward/unscored_frac"] > 0 for r in rows)
    assert all(torch.isfinite(torch.tensor([v for v in r.values() if isinstance(v, float)])).all()
               for r in metrics(tmp_path / method))


# --- bad input -------------------------------------------------------------------------------------------


def test_a_bad_prompts_row_fails_with_file_line_field_before_anything_is_written(tmp_path):
    from rlhfkit.train.grpo import GRPOConfig, train

    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "fine"}, {"prompt": ["not a message"]}])
    with pytest.raises(DataError, match=r"prompts.jsonl:2: field 'prompt\[0\]': expected a message"):
        train(GRPOConfig(**common(prompts=str(data), reward="verify:regex=x", output_dir=str(tmp_path / "run"))))
    assert not (tmp_path / "run").exists()


def test_a_verifier_without_the_answer_column_fails_at_start_up(tmp_path):
    from rlhfkit.train.grpo import GRPOConfig, train

    data = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    with pytest.raises(DataError, match=r"prompts.jsonl:1: field 'answer': reward 'verify:math' needs the 'answer' column"):
        train(GRPOConfig(**common(prompts=str(data), reward="verify:math", output_dir=str(tmp_path / "run"))))
    assert not (tmp_path / "run").exists()


def test_a_reward_function_that_raises_mid_run_names_itself_and_the_row_and_keeps_the_run_directory(tmp_path):
    from rlhfkit.train.grpo import GRPOConfig, train

    calls = []

    def flaky(prompts, completions, id, **kwargs):
        calls.append(1)
        if len(calls) == 2:   # step 1 scores, step 2 fails (no eval: eval_every=0)
            raise KeyError("boom")
        return [0.5] * len(completions)

    cfg = GRPOConfig(**common(total_steps=3, eval_every=0, output_dir=str(tmp_path / "run")))
    with pytest.raises(RuntimeError, match=r"reward function 'flaky' raised KeyError: 'boom' — on "):
        train(cfg, reward_fn=flaky, prompts=PROMPTS)
    written = metrics(tmp_path / "run")
    assert [r["step"] for r in written if "reward/mean" in r] == [1]         # step 1 is still there
    assert (tmp_path / "run" / "config.json").exists() or (tmp_path / "run" / "config.yaml").exists()


@pytest.mark.parametrize("kw,match", [(dict(prompts="p.jsonl", eval_fraction=1.0), r"eval_fraction must be in \[0, 1\)"),
                                      (dict(prompts="p.jsonl", eval_prompts_data="e.jsonl", eval_fraction=0.1),
                                       "eval_fraction must be None when eval_prompts_data is given"),
                                      (dict(prompts=" "), "prompts must be non-empty or None")])
def test_prompt_fields_are_validated(kw, match):
    from rlhfkit.train.grpo import GRPOConfig

    with pytest.raises(ValueError, match=match):
        GRPOConfig(**common(**kw))


@pytest.mark.parametrize("kw,match", [(dict(eval_fraction=0.2), "eval_fraction must be None without `prompts`"),
                                      (dict(eval_prompts_data="e.jsonl"), "eval_prompts_data must be None without")])
def test_held_out_fields_without_any_prompts_are_an_error_at_start(kw, match):
    from rlhfkit.train import online
    from rlhfkit.train.grpo import GRPOConfig

    with pytest.raises(ValueError, match=match):
        online.prompt_sets(GRPOConfig(**common(**kw)), task=ToyTask())


def test_each_process_takes_its_slice_of_the_step_rows_with_their_columns():
    """Two processes, 4 prompts per step: every process draws the same global batch from the stream
    and keeps its contiguous half; each row carries its own columns, so they cannot drift apart."""
    from types import SimpleNamespace

    from rlhfkit.data.prompt_data import load_prompt_rows
    from rlhfkit.train.online_rollout import PromptStream, local_prompts

    stream = PromptStream(load_prompt_rows(PROMPTS), seed=3)
    cfg = SimpleNamespace(prompts_per_step=4)
    batch = stream.batch(5, 4)
    halves = [local_prompts(SimpleNamespace(stream=stream, local_prompts=2, acc=SimpleNamespace(process_index=i)), 5, cfg)
              for i in (0, 1)]
    assert halves[0] + halves[1] == batch
    assert all(row.prompt == f"Count to {row.columns['target']}." for half in halves for row in half)


def test_the_cli_trains_on_a_prompts_file_with_a_verifier_and_a_reward_file(tmp_path):
    import subprocess
    import sys

    write_jsonl(tmp_path / "math.jsonl", [{"prompt": f"What is {i} plus {i}?", "answer": str(2 * i)} for i in range(10)])
    (tmp_path / "my_rewards.py").write_text("def brief(prompts, completions, **kw):\n"
                                            "    return [1.0 / (1 + len(c)) for c in completions]\n")
    cmd = [sys.executable, "-m", "rlhfkit.cli", "grpo", "--model", "tiny:0.5", "--prompts", "math.jsonl", "--eval-fraction",
           "0.2", "--reward", "verify:math,fn:my_rewards.py:brief@0.5", "--total-steps", "1", "--prompts-per-step", "2",
           "--samples-per-prompt", "2", "--max-new-tokens", "4", "--output-dir", "run"]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    last = metrics(tmp_path / "run")[-1]
    assert {"reward/verify_math/mean", "reward/brief/mean", "eval/reward/verify_math/mean", "eval/reward"} <= set(last)


def test_eval_fraction_zero_trains_on_every_prompt_and_evaluates_nothing(tmp_path):
    from rlhfkit.train.grpo import GRPOConfig, train

    def brief(completions, **kwargs):
        return [1.0 / (1 + len(c)) for c in completions]

    cfg = GRPOConfig(**common(total_steps=1, eval_every=1, eval_fraction=0.0, output_dir=str(tmp_path / "run")))
    result = train(cfg, reward_fn=brief, prompts=PROMPTS[:2])
    assert result["eval_start"] == {} and result["eval_end"] == {}
    assert [r["step"] for r in metrics(tmp_path / "run")] == [1]


def test_a_built_in_task_gives_its_rows_columns_so_verify_math_reads_arith_answers():
    from rlhfkit.data.tasks import get_task
    from rlhfkit.rollout.rewards import make_reward
    from rlhfkit.train import online
    from rlhfkit.train.grpo import GRPOConfig

    task, train_rows, held = online.prompt_sets(GRPOConfig(**common(task="arith")))
    assert [r.messages for r in train_rows] == get_task("arith").prompts("train")       # the same prompts as before
    assert all("answer" in r.columns for r in train_rows + held)
    make_reward("verify:math", None, task, torch.device("cpu")).check(train_rows + held)
    sentiment = online.task_rows(get_task("sentiment"), "train")
    assert {"id", "category"} <= set(sentiment[0].columns)
