"""rlhfkit: train dialogue models from human feedback."""

__version__ = "0.1.0"
