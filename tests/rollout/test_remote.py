"""Server mode: the rollout server (rlhfkit.rollout.server) and its client (rlhfkit.rollout.remote).

Every test runs a real uvicorn server on a free local port in a background thread and talks to it over a
socket. The expectations are independent of the server: what the trainer's own HFBackend samples from
the same weights with the same seed (exact ids), what the local model's completion_logps gives, what a
trainer with rollout_backend 'hf' logs.
"""

from __future__ import annotations

import contextlib
import copy
import json
import socket
import threading
import time
import types

import pytest
import requests
import torch
import uvicorn
from safetensors.torch import save
from toy_rl import ToyTask

from rlhfkit.models import load_model
from rlhfkit.models.loading import tiny_config
from rlhfkit.rollout.engine import HFBackend, Sampler, SamplingConfig
from rlhfkit.rollout.remote import RemoteBackend, weight_tensors
from rlhfkit.rollout.server import create_app
from rlhfkit.train import grpo, online

PROMPTS = [
    [{"role": "user", "content": "Hi."}],
    [{"role": "system", "content": "You are a careful assistant."},
     {"role": "user", "content": "Tell me, at some length, what you think about rainy autumn afternoons."}],
    [{"role": "user", "content": "Name a colour."}],
]


@contextlib.contextmanager
def serving(app):
    """``app`` on a uvicorn server in a daemon thread; yields its URL. The socket is bound before the
    thread starts, so the port is known and cannot be taken by anyone else in between."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the test server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def sample(model, tok, sampling, seed, backend=None):
    return Sampler(model, tok, sampling, backend=backend).sample(PROMPTS, seed=seed)


def perturbed(model, scale=0.05):
    out = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return out


def same_weights(a, b) -> bool:
    wa, wb = weight_tensors(a), weight_tensors(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


# --- sampling and log-probs equal the trainer's own HF backend --------------------------------------


@pytest.mark.parametrize("sampling,seed", [
    (SamplingConfig(temperature=0.0, max_new_tokens=8), None),                      # greedy
    (SamplingConfig(temperature=1.0, max_new_tokens=8), 123),                       # seeded sampling
    (SamplingConfig(temperature=0.7, top_p=0.9, top_k=50, max_new_tokens=8), 7),   # with the filters
])
def test_sampling_through_the_server_equals_the_hf_backend(tiny, sampling, seed):
    """Exact ids: the server left-pads the unpadded rows as the Sampler does and seeds generate alike.
    Its log-probs are the local model's completion_logps of the sampled tokens (the server computes them
    with its copy of the same weights)."""
    model, tok = tiny
    with serving(create_app(copy.deepcopy(model), tok)) as url:
        through = sample(model, tok, sampling, seed, RemoteBackend(url, tok))
    local = sample(model, tok, sampling, seed)
    assert torch.equal(through.completion_ids, local.completion_ids)
    assert torch.equal(through.completion_mask, local.completion_mask)
    torch.testing.assert_close(through.extras["sampler_logps"], local.logps, atol=1e-5, rtol=1e-5)
    assert local.extras.get("sampler_logps") is None  # the HF backend is the policy: no sampler log-probs


def test_a_weight_push_makes_the_server_sample_what_the_pushed_model_samples(tiny):
    model, tok = tiny
    served, moved = copy.deepcopy(model), perturbed(model)
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=8)
    with serving(create_app(served, tok)) as url:
        remote = RemoteBackend(url, tok)
        before = sample(model, tok, sampling, 5, remote)
        remote.sync_weights(moved)
        after = sample(moved, tok, sampling, 5, remote)
        assert remote.version == 1 and requests.get(url + "/health").json()["weights_version"] == 1
        # another client pushing to the same server: this one's samples would no longer be its policy's
        RemoteBackend(url, tok).sync_weights(model)
        with pytest.raises(RuntimeError, match="weights version 2, but this trainer last pushed version 1"):
            sample(moved, tok, sampling, 5, remote)
    expected = sample(moved, tok, sampling, 5)
    assert torch.equal(after.completion_ids, expected.completion_ids)
    assert not torch.equal(before.completion_ids, after.completion_ids)  # the push changed what it samples
    torch.testing.assert_close(after.extras["sampler_logps"], expected.logps, atol=1e-5, rtol=1e-5)
    assert same_weights(served, model)  # the last push (tied lm_head included: it is the embedding)
    assert served.lm_head.weight is served.model.embed_tokens.weight


class FakeProcesses:
    """Process ``rank`` of two, as accelerate's PartialState shows it; counts the barriers."""

    def __init__(self, rank: int):
        self.num_processes, self.is_main_process, self.barriers = 2, rank == 0, 0

    def wait_for_everyone(self):
        self.barriers += 1


def test_under_several_processes_every_process_gathers_and_only_the_main_one_pushes(tiny):
    """The push protocol of two processes, run one after the other on one thread: the second process
    (not main) gathers and waits but sends nothing; the main one sends; both then expect version 1 and
    generate from it. (The real two-process gather is sharding.full_parameters, tested on its own.)"""
    model, tok = tiny
    moved = perturbed(model)
    gathered = []

    @contextlib.contextmanager
    def gather(m):
        gathered.append(m)
        yield m

    with serving(create_app(copy.deepcopy(model), tok)) as url:
        main_rank = RemoteBackend(url, tok, acc=FakeProcesses(0), gather=gather)
        other_rank = RemoteBackend(url, tok, acc=FakeProcesses(1), gather=gather)
        other_rank.sync_weights(moved)
        assert requests.get(url + "/health").json()["weights_version"] == 0  # the other process sent nothing
        main_rank.sync_weights(moved)
        assert requests.get(url + "/health").json()["weights_version"] == 1
        sampling = SamplingConfig(temperature=1.0, max_new_tokens=6)
        for rank in (main_rank, other_rank):
            assert rank.version == 1 and rank.acc.barriers == 2  # before and after the push
            assert torch.equal(sample(moved, tok, sampling, 9, rank).completion_ids,
                               sample(moved, tok, sampling, 9).completion_ids)
    assert gathered == [moved, moved]


def test_a_bad_weight_push_is_a_400_naming_the_key_and_keeps_the_old_weights(tiny):
    model, tok = tiny
    served = copy.deepcopy(model)
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=6)
    # every other tensor is changed, so a push that loaded part of its tensors before failing would show
    good = {k: (v * 2).contiguous() for k, v in weight_tensors(model).items()}
    norm = "model.norm.weight"
    cases = [
        ({**good, "model.extra.weight": torch.zeros(2)}, 1, "unknown key 'model.extra.weight'"),
        ({**good, norm: torch.zeros(3)}, 1, f"key '{norm}' has shape (3,) but the served model's is (64,)"),
        ({k: v for k, v in good.items() if k != norm}, 1, f"missing key '{norm}'"),
        ({**good, norm: torch.ones(64, dtype=torch.long)}, 1, f"key '{norm}' has dtype torch.int64"),
        (good, 0, "version: 0 is not greater than the served weights' version 0"),
    ]
    with serving(create_app(served, tok)) as url:
        remote = RemoteBackend(url, tok)
        before = sample(model, tok, sampling, 3, remote)
        for payload, version, message in cases:
            resp = requests.post(url + "/weights", params={"version": version}, data=save(payload))
            assert resp.status_code == 400 and message in resp.json()["detail"], resp.text
        resp = requests.post(url + "/weights", params={"version": 1}, data=b"not a safetensors file")
        assert resp.status_code == 400 and resp.json()["detail"].startswith("body: not a safetensors file")
        resp = requests.post(url + "/weights", data=save(good))
        assert resp.status_code == 422 and resp.json()["detail"][0]["loc"] == ["query", "version"]
        # the client's own push of another architecture: an error naming the key, no version change
        other = type(model)(tiny_config(tok, hidden_size=32))
        with pytest.raises(RuntimeError, match="HTTP 400: weights: key 'model.embed_tokens.weight' has shape"):
            remote.sync_weights(other)
        assert remote.version == 0 and requests.get(url + "/health").json()["weights_version"] == 0
        after = sample(model, tok, sampling, 3, remote)
    assert same_weights(served, model)
    assert torch.equal(before.completion_ids, after.completion_ids)


# --- request validation ---------------------------------------------------------------------------------


def test_bad_generate_requests_are_4xx_naming_the_field(tiny):
    model, tok = tiny
    vocab = model.get_input_embeddings().num_embeddings
    ok = {"prompt_token_ids": [[1, 2, 3], [4]], "sampling": {"temperature": 1.0, "max_new_tokens": 4}, "seed": 1}
    cases = [
        ({**ok, "prompt_token_ids": []}, ["body", "prompt_token_ids"]),
        ({**ok, "prompt_token_ids": [[1], []]}, ["body", "prompt_token_ids", 1]),
        ({**ok, "prompt_token_ids": [[1, vocab]]}, ["body", "prompt_token_ids", 0, 1]),
        ({**ok, "prompt_token_ids": [[1, 2], [-1]]}, ["body", "prompt_token_ids", 1, 0]),
        ({**ok, "prompt_token_ids": [[1, "2"]]}, ["body", "prompt_token_ids", 0, 1]),
        ({k: v for k, v in ok.items() if k != "prompt_token_ids"}, ["body", "prompt_token_ids"]),
        ({**ok, "sampling": {"temperature": 1.0}}, ["body", "sampling", "max_new_tokens"]),
        ({**ok, "sampling": {"temperature": 1.0, "max_new_tokens": 0}}, ["body", "sampling", "max_new_tokens"]),
        ({**ok, "sampling": {"temperature": 1.0, "max_new_tokens": 5000}}, ["body", "sampling", "max_new_tokens"]),
        ({**ok, "sampling": {"temperature": -1.0, "max_new_tokens": 4}}, ["body", "sampling", "temperature"]),
        ({**ok, "sampling": {"temperature": 1.0, "top_p": 0, "max_new_tokens": 4}}, ["body", "sampling", "top_p"]),
        ({**ok, "sampling": {"temperature": 1.0, "max_tokens": 4, "max_new_tokens": 4}},
         ["body", "sampling", "max_tokens"]),
        ({**ok, "seed": -1}, ["body", "seed"]),
    ]
    with serving(create_app(copy.deepcopy(model), tok)) as url:
        assert requests.post(url + "/generate", json=ok).status_code == 200
        for body, loc in cases:
            resp = requests.post(url + "/generate", json=body)
            assert resp.status_code == 422, (body, resp.text)
            assert loc in [e["loc"][:len(loc)] for e in resp.json()["detail"]], (loc, resp.text)
        assert "outside the served model's vocabulary" in requests.post(
            url + "/generate", json=cases[2][0]).json()["detail"][0]["msg"]
        wrong_tok = types.SimpleNamespace(eos_token_id=tok.eos_token_id + 1, pad_token_id=tok.pad_token_id)
        with pytest.raises(ValueError, match="eos_token_id"):
            RemoteBackend(url, wrong_tok)


# --- timeouts and connection errors -----------------------------------------------------------------


class SlowBackend(HFBackend):
    """An HF backend whose generate and weight sync take longer than the client waits."""

    def generate(self, *args, **kwargs):
        time.sleep(0.8)
        return super().generate(*args, **kwargs)

    def sync_weights(self, model):
        time.sleep(0.8)


def test_a_server_slower_than_the_timeouts_stops_the_run_naming_the_step(tiny):
    model, tok = tiny
    served = copy.deepcopy(model)
    with serving(create_app(served, tok, SlowBackend(served, tok))) as url:
        remote = RemoteBackend(url, tok, timeout_s=0.2, sync_timeout_s=0.2)
        remote.step = 3
        with pytest.raises(TimeoutError, match=r"/generate at training step 3 did not finish within 0.2 s "
                                               r"\(rollout_timeout_s\)"):
            sample(model, tok, SamplingConfig(max_new_tokens=2), 0, remote)
        with pytest.raises(TimeoutError, match=r"weight push \(version 1\) after training step 3 did not finish "
                                               r"within 0.2 s \(weight_sync_timeout_s\)"):
            remote.sync_weights(model)


def test_an_unreachable_server_is_a_clear_error_at_construction(tokenizer):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()  # nothing listens there now
    with pytest.raises(RuntimeError, match=rf"cannot reach the rollout server at {url} .*rlhfkit serve-rollouts"):
        RemoteBackend(url, tokenizer)


# --- the trainer: GRPO through a server equals GRPO with the HF backend -------------------------------


def token_reward(r):
    """A reward that depends on which tokens were sampled (ids mod 7, mean over the completion)."""
    m = r.completion_mask
    return ((r.completion_ids % 7).float() * m).sum(1) / m.sum(1).clamp(min=1)


def run_grpo(out, **kw):
    cfg = grpo.GRPOConfig(model="tiny:0.5", task="toy", total_steps=2, prompts_per_step=2, samples_per_prompt=2,
                          max_new_tokens=6, temperature=1.0, missing_eos_penalty=None, eval_every=0, progress=False,
                          lr=5e-2, lr_schedule="constant", output_dir=str(out), **kw)
    grpo.train(cfg, reward_fn=token_reward, task=ToyTask())
    metrics = [json.loads(line) for line in open(out / "metrics.jsonl")]
    samples = [json.loads(line) for line in open(out / "samples.jsonl")]
    return [m for m in metrics if "reward/mean" in m], samples


def test_grpo_through_a_rollout_server_equals_grpo_with_the_hf_backend(tmp_path):
    """Same seed, same per-step rewards, completions and losses. The server starts from *other* weights
    (seed 7): only the trainer's push at start makes step 0 agree, and only the push after step 1's
    update makes step 2 agree (lr 5e-2 moves the tiny model a lot). The server's log-probs are the
    policy's to float rounding (logp_diff ~0), so the IS weights are 1 and the losses match."""
    served, tok = load_model("tiny:0.5", seed=7)
    with serving(create_app(served, tok)) as url:
        remote, remote_samples = run_grpo(tmp_path / "remote", rollout_backend="remote", rollout_server=url)
        pushes = requests.get(url + "/health").json()["weights_version"]
    hf, hf_samples = run_grpo(tmp_path / "hf", rollout_backend="hf")
    assert len(remote) == len(hf) == 2
    assert remote_samples == hf_samples  # step 1's completions, text and reward
    for r, h in zip(remote, hf):
        assert r["reward/mean"] == h["reward/mean"] and r["rollout/length"] == h["rollout/length"]
        losses = [k for k in h if k.startswith("loss/")]
        assert losses
        for k in losses:
            assert r[k] == pytest.approx(h[k], rel=1e-4, abs=1e-6), k
        assert r["rollout/logp_diff_mean"] < 1e-5 and r["rollout/is_weight_mean"] == pytest.approx(1.0, abs=1e-5)
        assert "rollout/logp_diff_mean" not in h  # hf: no sampler log-probs
    assert pushes == 3  # at start, and after each of the 2 updates


# --- configuration ----------------------------------------------------------------------------------


def test_remote_needs_a_url_and_a_url_needs_remote():
    with pytest.raises(ValueError, match="rollout_server must be the URL of a running `rlhfkit serve-rollouts`"):
        grpo.GRPOConfig(rollout_backend="remote")
    with pytest.raises(ValueError, match="rollout_server must be the URL"):
        grpo.GRPOConfig(rollout_backend="remote", rollout_server="gen-host:8000")  # no scheme
    with pytest.raises(ValueError, match="rollout_server must be None unless rollout_backend is 'remote'"):
        grpo.GRPOConfig(rollout_backend="hf", rollout_server="http://127.0.0.1:8000")
    with pytest.raises(ValueError, match="rollout_timeout_s must be > 0"):
        grpo.GRPOConfig(rollout_backend="remote", rollout_server="http://127.0.0.1:8000", rollout_timeout_s=0)


def test_lora_with_the_remote_backend_is_an_error_before_any_model_loads(monkeypatch):
    monkeypatch.setattr(online, "load_policy", lambda *a, **k: pytest.fail("loaded a model"))
    cfg = grpo.GRPOConfig(model="tiny:0.5", task="toy", lora_r=4, rollout_backend="remote",
                          rollout_server="http://127.0.0.1:9", progress=False)
    with pytest.raises(ValueError, match="lora_r > 0 needs rollout_backend 'hf' or 'auto', got 'remote'"):
        online.start(cfg, task=ToyTask())


def test_the_serve_rollouts_command_builds_the_server(monkeypatch):
    """`rlhfkit serve-rollouts` through the CLI registry, uvicorn.run replaced by a catcher; the fast
    backend's own log-probs come back with its completions."""
    from fastapi.testclient import TestClient

    from rlhfkit.cli import main

    ran = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port, **kw: ran.update(app=app, host=host, port=port))
    assert main(["serve-rollouts", "--model", "tiny", "--backend", "fast", "--port", "8123"]) == 0
    assert (ran["host"], ran["port"]) == ("127.0.0.1", 8123)
    client = TestClient(ran["app"])
    assert client.get("/health").json()["backend"] == "fast"
    out = client.post("/generate", json={"prompt_token_ids": [[1, 2, 3], [4, 5]], "seed": 0,
                                         "sampling": {"temperature": 1.0, "max_new_tokens": 5}}).json()
    assert [len(lp) for lp in out["logps"]] == [len(c) for c in out["completion_ids"]]
    assert all(0 < len(c) <= 5 for c in out["completion_ids"])
    assert all(lp <= 0 for row in out["logps"] for lp in row)
