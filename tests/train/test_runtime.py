"""Checkpoint files: plain tensors and values only, read with ``torch.load(weights_only=True)``.

A checkpoint directory from someone else must not run code on resume; a checkpoint written before
this format (numpy's RNG state pickled as numpy objects) is refused with a message that says what to do.
The exact RNG round trip is what the trainers' resume-equality tests rely on.
"""

from __future__ import annotations

import pickle
import random

import numpy as np
import pytest
import torch

from rlhfkit.train import runtime


def draws() -> tuple:
    return torch.rand(3).tolist(), np.random.rand(3).tolist(), np.random.randn(), [random.random() for _ in range(3)]


def test_rng_round_trip_through_a_weights_only_file_is_exact(tmp_path):
    runtime.seed_everything(7)
    np.random.randn()  # leaves a cached Gaussian in numpy's legacy state: it must survive the round trip
    random.gauss(0, 1)  # and Python's gauss_next
    torch.save({"step": 5, "rng": runtime.rng_state()}, tmp_path / runtime.STATE_FILE)
    expected = draws()
    runtime.seed_everything(123)  # anything else
    state = runtime.load_trainer_state(tmp_path)
    assert state == {"step": 5}
    assert draws() == expected


def test_trainer_state_values_are_plain(tmp_path):
    """numpy scalars and arrays in a trainer's extra state are stored as Python numbers and tensors;
    an object that could only be unpickled is an error when saving, not a surprise on resume."""
    plain = runtime._plain({"kl": {"beta": np.float64(0.5)}, "counts": np.arange(3), "t": [np.int64(2)]}, "state")
    assert plain["kl"]["beta"] == 0.5 and type(plain["kl"]["beta"]) is float
    assert torch.equal(plain["counts"], torch.arange(3)) and plain["t"] == [2]
    with pytest.raises(TypeError, match=r"state\['when'\]: a object cannot go into a checkpoint"):
        runtime._plain({"when": object()}, "state")


class Exploit:
    """Unpickling this calls ``open(marker, "w")``: code run by merely loading the file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("name", [runtime.STATE_FILE, "rng-0.pt"])
def test_a_crafted_checkpoint_is_refused_and_runs_nothing(tmp_path, name):
    marker = tmp_path / "pwned"
    torch.save({"step": 1, "rng": runtime.rng_state()}, tmp_path / runtime.STATE_FILE)
    torch.save({"step": 1, "payload": Exploit(marker)}, tmp_path / name)
    pickle.loads(pickle.dumps(Exploit(tmp_path / "control"))).close()  # teeth: a plain unpickle runs it
    assert (tmp_path / "control").exists()
    with pytest.raises(runtime.UnsafeCheckpointError, match="could run code") as e:
        runtime.restore(tmp_path, optimizer=None, scheduler=None, rank=0)
    assert "do not use it" in str(e.value) and str(tmp_path / name) in str(e.value)
    assert not marker.exists()


def test_a_checkpoint_from_before_plain_state_says_to_use_an_older_rlhfkit(tmp_path):
    """rlhfkit 0.1.0 saved np.random.get_state() (a numpy array inside) with weights_only=False."""
    old_rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    torch.save({"step": 3, "scheduler": None, "rng": old_rng}, tmp_path / runtime.STATE_FILE)
    with pytest.raises(runtime.UnsafeCheckpointError, match="older rlhfkit") as e:
        runtime.load_trainer_state(tmp_path)
    assert "restart the run" in str(e.value) and "numpy" in str(e.value)


def _tied_step(sparse: bool, micro_batches: int = 2):
    """Two micro-batch backward passes of a language-model loss on the tiny (tied) model; its embedding grad."""
    from types import SimpleNamespace

    from rlhfkit.models import load_model

    model, _ = load_model("tiny", seed=0)
    if sparse:
        assert runtime.sparse_tied_embedding_grad(model, SimpleNamespace(num_processes=1))
    ids = torch.randint(0, model.config.vocab_size, (micro_batches, 2, 9), generator=torch.Generator().manual_seed(1))
    for mb in ids:
        logits = model(input_ids=mb).logits[:, :-1]
        torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), mb[:, 1:].reshape(-1)).backward()
    return model.get_input_embeddings().weight.grad


def test_sparse_tied_embedding_grad_gives_the_dense_gradient():
    """The lookup's sparse rows add into the head's dense gradient: the same .grad, dense, over two
    accumulated backward passes."""
    dense, sparse = _tied_step(False), _tied_step(True)
    assert not sparse.is_sparse and sparse.layout == torch.strided
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-7)
    assert dense.abs().sum() > 0


def test_sparse_tied_embedding_grad_is_left_off_where_it_cannot_apply():
    from types import SimpleNamespace

    from rlhfkit.models import load_model

    one, two = SimpleNamespace(num_processes=1), SimpleNamespace(num_processes=2)
    model, _ = load_model("tiny", seed=0)
    assert not runtime.sparse_tied_embedding_grad(model, two)  # DDP / FSDP / ZeRO reduce dense buckets
    model.get_input_embeddings().weight.requires_grad_(False)  # frozen (LoRA): no gradient at all
    assert not runtime.sparse_tied_embedding_grad(model, one)
    model, _ = load_model("tiny", seed=0)
    model.get_output_embeddings().weight = torch.nn.Parameter(model.get_input_embeddings().weight.detach().clone())
    assert not runtime.sparse_tied_embedding_grad(model, one)  # untied
    assert not model.get_input_embeddings().sparse
