"""Server mode, the trainer's side: a generation backend that asks a rollout server over HTTP.

The server (rlhfkit.rollout.server, started by ``rlhfkit serve-rollouts``) runs on another process or
machine and holds its own copy of the policy. :class:`RemoteBackend` has the interface of the other
backends (engine.py)::

    generate(prompt_ids, prompt_mask, sampling, seed)  ->  POST /generate  {prompt_token_ids: unpadded rows,
                                                            sampling, seed} -> completion ids + log-probs
    sync_weights(model)                                 ->  POST /weights?version=N  body: safetensors bytes

The completions come back unpadded (each row through its first EOS) and are right-padded here; the
server's log-probs of the sampled tokens become :attr:`RemoteBackend.last_logps`, so the Sampler keeps
them as ``extras['sampler_logps']`` and importance_sampling='auto' corrects (and logs) the gap.

Versions: each push carries the next version number; every answer from the server carries the version it
generated with, and one that differs from what this client last pushed (the server restarted, or another
trainer pushed to it) is an error: the samples would come from weights the trainer does not have.
Timeouts: a request past its limit raises ``TimeoutError`` naming the training step (``step``, set by
rlhfkit.train.online_rollout, as for the vLLM backend).
"""

from __future__ import annotations

import contextlib
import itertools
from typing import Callable

import torch

from rlhfkit.models.batching import right_pad
from rlhfkit.rollout.engine import SamplingConfig

GENERATE_TIMEOUT_S = 600.0
"""Default seconds a /generate request may take (``OnlineConfig.rollout_timeout_s``)."""
SYNC_TIMEOUT_S = 300.0
"""Default seconds a weight push may take (``OnlineConfig.weight_sync_timeout_s``)."""
HEALTH_TIMEOUT_S = 10.0
"""Seconds the construction-time /health request may take: it does no work on the server."""
START_HINT = ("start one with `rlhfkit serve-rollouts --model MODEL --host HOST --port PORT` on the generation "
              "machine and set rollout_server to its URL")


def weight_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tensors a weight push carries: every parameter (a tied one once, under its first name, as
    ``named_parameters`` lists it) and every persistent buffer, by state-dict name.

    Why not ``model.state_dict()``: it repeats tied tensors, which ``safetensors`` refuses to save, and
    under FSDP2 its pre-hook reshards the module, while the push runs inside ``full_parameters``' gather.
    Client and server both call this, so a model with the same architecture gives the same keys."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for mod_name, mod in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        # the module's own tensors only; a name in _non_persistent_buffers_set is not in the state dict
        for name, t in itertools.chain(mod.named_parameters(recurse=False), mod.named_buffers(recurse=False)):
            if t is None or name in mod._non_persistent_buffers_set or id(t) in seen:
                continue
            seen.add(id(t))
            out[prefix + name] = t
    return out


def serialize_weights(model: torch.nn.Module) -> bytes:
    """``weight_tensors(model)`` as safetensors bytes (CPU, contiguous copies; no pickle)."""
    from safetensors.torch import save

    return save({k: v.detach().to("cpu").contiguous() for k, v in weight_tensors(model).items()})


class RemoteBackend:
    """Generation on a rollout server (``rlhfkit serve-rollouts``).

    Args: ``url`` the server's base URL; ``tokenizer`` the trainer's (its pad and EOS ids must be the
    server's: checked at construction); ``timeout_s`` seconds a /generate may take; ``sync_timeout_s``
    seconds a weight push may take; ``session`` an HTTP session with ``get``/``post`` like
    ``requests.Session`` (tests inject one); ``acc`` several processes: an object with ``num_processes``,
    ``is_main_process`` and ``wait_for_everyone()`` (accelerate's PartialState or Accelerator), None for
    one; ``gather(model)`` a context manager yielding the model with full parameters (FSDP / ZeRO-3:
    ``rlhfkit.train.sharding.full_parameters``), None = the model as it is.
    Attributes: ``last_logps`` (B, C) float32 the server's log-probs of the sampled tokens, 0 after a row's
    end (None when the server reports none); ``version`` the weights version this client expects the
    server to hold; ``step`` the training step the loop last sampled for, named in errors.
    Construction asks ``GET /health`` once and raises when the server is unreachable or incompatible.
    """

    def __init__(self, url: str, tokenizer, *, timeout_s: float = GENERATE_TIMEOUT_S,
                 sync_timeout_s: float = SYNC_TIMEOUT_S, session=None, acc=None,
                 gather: Callable[[torch.nn.Module], contextlib.AbstractContextManager] | None = None):
        import requests  # imported when a remote backend is built

        self._requests = requests
        self.url = url.rstrip("/")
        self.tok = tokenizer
        self.timeout_s, self.sync_timeout_s = timeout_s, sync_timeout_s
        self.session = session or requests.Session()
        self.acc, self.gather = acc, gather
        self.step: int | None = None
        self.last_logps: torch.Tensor | None = None
        health = self._request("get", "/health", HEALTH_TIMEOUT_S, "asking /health at start")
        for key, mine in (("eos_token_id", tokenizer.eos_token_id), ("pad_token_id", tokenizer.pad_token_id)):
            if key in health and health[key] != mine:
                raise ValueError(f"the rollout server at {self.url} serves {health.get('model')!r}, whose {key} is "
                                 f"{health[key]} while the trainer's tokenizer has {mine}: serve the trainer's model")
        self.server = health
        self.version = int(health["weights_version"])

    def _where(self) -> str:
        return "before the first step" if self.step is None else f"at training step {self.step}"

    def _request(self, method: str, path: str, timeout_s: float, what: str, setting: str = "", **kwargs) -> dict:
        """One HTTP request; its JSON answer, or an error that says what failed and what to do."""
        req = self._requests
        try:
            resp = getattr(self.session, method)(self.url + path, timeout=timeout_s, **kwargs)
        except req.exceptions.Timeout as e:  # before ConnectionError: ConnectTimeout is both
            raise TimeoutError(f"rollout server {self.url}: {what} did not finish within {timeout_s:g} s"
                               f"{f' ({setting})' if setting else ''}; the run stops here rather than train "
                               "on missing or stale samples") from e
        except req.exceptions.ConnectionError as e:
            raise RuntimeError(f"cannot reach the rollout server at {self.url} ({what}): {e}. Is it running? "
                               + START_HINT) from e
        if resp.status_code != 200:
            try:
                detail = resp.json().get("detail", resp.text)
            except ValueError:
                detail = resp.text
            raise RuntimeError(f"rollout server {self.url}: {what} failed with HTTP {resp.status_code}: {detail}")
        return resp.json()

    def _check_version(self, served: int, what: str) -> None:
        if served != self.version:
            raise RuntimeError(
                f"rollout server {self.url} answered {what} with weights version {served}, but this trainer last "
                f"pushed version {self.version}: the server restarted or another trainer pushed to it, so its "
                "samples are not from the policy being trained; give each trainer its own server")

    @torch.no_grad()
    def generate(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, sampling: SamplingConfig,
                 generator_seed: int | None = None) -> torch.Tensor:
        """Right-padded completion ids (B, C) on ``prompt_ids``' device; sets :attr:`last_logps`."""
        self.last_logps = None
        body = {
            "prompt_token_ids": [row[m].tolist() for row, m in zip(prompt_ids, prompt_mask.bool())],
            "sampling": {"temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": sampling.top_k,
                         "max_new_tokens": sampling.max_new_tokens},
            "seed": generator_seed,
        }
        what = f"/generate {self._where()}"
        out = self._request("post", "/generate", self.timeout_s, what, "rollout_timeout_s", json=body)
        self._check_version(int(out["weights_version"]), what)
        rows = out["completion_ids"]
        if len(rows) != len(body["prompt_token_ids"]):
            raise RuntimeError(f"rollout server {self.url} returned {len(rows)} completions for "
                               f"{len(body['prompt_token_ids'])} prompts")
        ids, mask = right_pad(rows, self.tok.pad_token_id)
        if out.get("logps") is not None:  # (B, C) like ids, 0 after each row's end
            self.last_logps = torch.zeros(ids.shape)
            for r, lps in enumerate(out["logps"]):
                if len(lps) != len(rows[r]):
                    raise RuntimeError(f"rollout server {self.url}: row {r} has {len(rows[r])} tokens but "
                                       f"{len(lps)} log-probs")
                self.last_logps[r, :len(lps)] = torch.tensor(lps, dtype=torch.float32)
        return ids.to(prompt_ids.device)

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Push ``model``'s weights (see :func:`weight_tensors`) as the next version, or raise.

        Several processes: every process enters (the gather is a collective under FSDP / ZeRO-3), the main
        process alone pushes, and the others wait for it, then all expect the new version. The barrier
        before the push keeps a slow process's construction-time /health from reading the new version."""
        version = self.version + 1
        several = self.acc is not None and self.acc.num_processes > 1
        if several:
            self.acc.wait_for_everyone()
        with (self.gather(model) if self.gather is not None else contextlib.nullcontext(model)) as full:
            if not several or self.acc.is_main_process:
                self._push(full, version)
        if several:
            self.acc.wait_for_everyone()  # the server holds the new weights before any process generates again
        self.version = version

    def _push(self, model: torch.nn.Module, version: int) -> None:
        where = "before the first step" if self.step is None else f"after training step {self.step}"
        body = serialize_weights(model)
        out = self._request("post", "/weights", self.sync_timeout_s, f"the weight push (version {version}) {where}",
                            "weight_sync_timeout_s", params={"version": version}, data=body,
                            headers={"Content-Type": "application/octet-stream"})
        if int(out["weights_version"]) != version:
            raise RuntimeError(f"rollout server {self.url} took the weight push {where} as version "
                               f"{out['weights_version']}, not {version}")
