"""GRPO and PPO on two processes (torchrun, gloo, DDP) against one process with the same global batch,
and the batch-split errors of a sharded launch.

Both runs draw the same completions (grpo_two_process.row_seeded_generation: without it the per-rank
sampling seeds make the samples differ), so every difference left comes from the training side: loss
normalisation, DDP's gradient all-reduce, the metric reduction. Tolerance: rel 1e-4 / abs 1e-5. The
log-prob passes see differently shaped batches in the two runs (8 rows vs 16, other packed rows), so
they agree to float32 rounding (~1e-7 relative); measured here over 3 steps at lr 1e-3 the largest
difference was 2e-7 (GRPO). A missing all-reduce, a loss scaled by the process count or per-process
statistics leaking into the update show up as differences of 1e-3 or more (PPO's per-process
whitening did).
"""

from __future__ import annotations

import json
import types
from pathlib import Path

import grpo_two_process
import ppo_two_process
import pytest
from grpo_two_process import row_seeded_generation
from torchrun import run_two_processes

from rlhfkit.tracking import read_metrics
from rlhfkit.train import grpo, online, ppo, runtime
from rlhfkit.train.sharding import check_process_split

TESTS = Path(__file__).parent


def one_and_two(script: str, config, train, tmp: Path) -> tuple[list[dict], list[dict]]:
    """(one-process metrics, two-process metrics) of the same config and the same samples."""
    run_two_processes(TESTS / script, tmp / "two", timeout=240)
    record = json.loads((tmp / "two" / "processes.json").read_text())
    assert record == {"num_processes": 2, "backend": "gloo"}
    with row_seeded_generation():
        train(config(str(tmp / "one")))
    return read_metrics(tmp / "one"), read_metrics(tmp / "two")


def assert_match(one: list[dict], two: list[dict], keys: tuple[str, ...], steps: int) -> None:
    """The training steps' rows (step >= 1; the step-0 eval row is compared on its own) agree on ``keys``."""
    one, two = [r for r in one if r["step"] > 0], [r for r in two if r["step"] > 0]
    assert [row["step"] for row in one] == [row["step"] for row in two] == list(range(1, steps + 1))
    for a, b in zip(one, two):
        for key in keys:
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), (a["step"], key)


@pytest.fixture(scope="module")
def grpo_runs(tmp_path_factory):
    return one_and_two("grpo_two_process.py", grpo_two_process.config, grpo.train, tmp_path_factory.mktemp("grpo"))


@pytest.fixture(scope="module")
def ppo_runs(tmp_path_factory):
    return one_and_two("ppo_two_process.py", ppo_two_process.config, ppo.train, tmp_path_factory.mktemp("ppo"))


GRPO_KEYS = ("loss/policy", "loss/kl", "optim/grad_norm", "kl/seq", "reward/mean", "policy/entropy")
"""Not reward/std: each process logs the std of its own rows and end_of_step averages them, which is
not the std of the global batch (0.138 vs 0.148 at step 1 here); a metric, not the update."""


@pytest.mark.slow
def test_grpo_two_processes_match_one(grpo_runs):
    """Global batch 4 prompts x 4 completions, 2 prompts per process. The policy loss is ~0 at a ratio of
    1 (group-normalised advantages), so the KL term and the gradient norm carry the check: both depend
    on every earlier update having averaged the two processes' gradients."""
    one, two = grpo_runs
    assert_match(one, two, GRPO_KEYS, grpo_two_process.STEPS)
    assert one[1]["optim/grad_norm"] > 0.1 and one[-1]["loss/kl"] > 1e-4  # the check is not on zeros
    # the eval hook (sampling inside sharding.full_parameters) at the start and the end: the main process's
    # eval, on the policy both runs trained, sampled with the same seed
    assert one[0]["step"] == two[0]["step"] == 0
    for a, b in ((one[0], two[0]), (one[-1], two[-1])):
        for key in ("eval/gold", "eval/kl", "eval/length"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), (a["step"], key)
    assert abs(one[-1]["eval/kl"]) > 1e-3  # a 4-sample estimate of the KL: its sign is noise, its size is not 0


@pytest.mark.slow
def test_ppo_two_processes_sample_and_fit_the_critic_like_one(ppo_runs):
    """Step 1's samples, rewards and critic loss (the critic's update does not use the advantages)."""
    one, two = ppo_runs
    assert_match(one[:1], two[:1], ("reward/mean", "loss/value", "policy/entropy"), 1)
    assert one[0]["loss/value"] > 1e-3


@pytest.mark.slow
def test_ppo_two_processes_match_one(ppo_runs):
    """The whole update: ppo.py whitens the advantages over the global batch (losses.advantages.whiten with
    sums all-reduced); with each process's own mean and variance the grad norm differed from step 1
    (1.447 vs 1.486)."""
    one, two = ppo_runs
    assert_match(one, two, ("loss/policy", "loss/value", "optim/grad_norm", "kl/seq"), ppo_two_process.STEPS)


# --- a batch that does not split over the processes: an error before any model loads ----------------


@pytest.fixture
def three_processes(monkeypatch):
    """online.start sees an accelerator with 3 processes; loading a model fails the test."""
    acc = types.SimpleNamespace(num_processes=3, process_index=0, device="cpu", is_main_process=True)
    monkeypatch.setattr(runtime, "make_accelerator", lambda *a, **k: acc)

    def no_load(*a, **k):
        raise AssertionError("a model was loaded before the batch split was checked")
    monkeypatch.setattr(online, "load_model", no_load)
    if hasattr(online, "load_policy"):
        monkeypatch.setattr(online, "load_policy", no_load)


def test_prompts_that_do_not_split_over_the_processes_fail_first(three_processes, tmp_path):
    cfg = grpo.GRPOConfig(model="tiny", prompts_per_step=8, samples_per_prompt=4, output_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"prompts_per_step=8 does not divide by the process count \(3\).*"
                                         r"samples_per_prompt=4.*= 32 completions.*multiple of 3"):
        grpo.train(cfg)


def test_mini_batch_that_does_not_split_the_process_batch_fails_first(three_processes, tmp_path):
    cfg = ppo.PPOConfig(model="tiny", prompts_per_step=6, samples_per_prompt=1, mini_batch_size=4,
                        output_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"mini_batch_size=4 does not divide the rollout batch per process.*"
                                         r"prompts_per_step=6 / 3 processes x samples_per_prompt=1 = 2"):
        ppo.train(cfg)


def test_a_batch_that_splits_passes_the_check(recwarn):
    check_process_split(grpo.GRPOConfig(prompts_per_step=6, samples_per_prompt=4, mini_batch_size=6), 2)
    check_process_split(ppo.PPOConfig(prompts_per_step=8, samples_per_prompt=1, mini_batch_size=4), 2)
    check_process_split(grpo.GRPOConfig(max_new_tokens=512, micro_batch_size=4), 2)  # 4 x 512 = 2048: not over (completions only)
    assert not recwarn.list


def test_packed_rows_that_could_differ_between_processes_warn_under_fsdp_only(recwarn):
    """8 completions of up to 512 tokens pack into 1 to 3 rows of 2048 depending on their lengths: under FSDP
    or ZeRO-3 the processes would then make different numbers of collective forwards (docs/distributed.md).
    DDP's forwards make no collective (no buffer broadcast): no warning there."""
    from accelerate.utils import DistributedType

    long = dict(prompts_per_step=8, samples_per_prompt=4, max_new_tokens=512)
    for sharded in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        with pytest.warns(UserWarning, match=r"share_prompts with 2 processes: .* 8 x max_new_tokens=512 = 4096 "
                                             r"tokens.*Set share_prompts false"):
            check_process_split(grpo.GRPOConfig(**long), 2, sharded)
    check_process_split(grpo.GRPOConfig(**long), 2, DistributedType.MULTI_GPU)  # DDP
    check_process_split(grpo.GRPOConfig(**long), 2, DistributedType.MULTI_CPU)
    check_process_split(grpo.GRPOConfig(**long), 1, DistributedType.FSDP)  # one process: nothing to disagree with
    check_process_split(grpo.GRPOConfig(**long, share_prompts=False), 2, DistributedType.FSDP)  # one forward per micro-batch
    assert not recwarn.list


@pytest.mark.slow
def test_grpo_two_processes_with_unequal_packed_forwards_finish(tmp_path):
    """online_config.SHARED_ROW_TOKENS = 64: each micro-batch's log-prob pass packs into a length-dependent number
    of rows, so the two processes make different numbers of forwards through the DDP wrapper. With DDP's
    buffer broadcast on (a collective per forward) this run hung; runtime.make_accelerator turns it off."""
    run_two_processes(TESTS / "grpo_two_process.py", tmp_path, 64, timeout=150)
    rows = read_metrics(tmp_path)
    assert [row["step"] for row in rows if row["step"] > 0] == list(range(1, grpo_two_process.STEPS + 1))
