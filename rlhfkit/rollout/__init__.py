"""Sampling engine (transformers backend, vLLM backend) and the Rollout batch."""

from rlhfkit.rollout.engine import HFBackend, Rollout, Sampler, SamplingConfig

__all__ = ["HFBackend", "Rollout", "Sampler", "SamplingConfig"]
