"""Losses: reward modelling (``reward``), PPO (``ppo``) and the DPO family with KTO (``dpo``).

Each loss is a pure function ``tensors -> (loss, metrics)``. Re-exported here for convenience.
"""

from rlhfkit.losses.dpo import (
    DPO_LOSSES,
    REFERENCE_FREE,
    PairLogps,
    hinge_loss,
    ipo_loss,
    kto_kl_estimate,
    kto_loss,
    orpo_loss,
    robust_loss,
    sigmoid_loss,
    simpo_loss,
)
from rlhfkit.losses.ppo import ppo_policy_loss, value_loss
from rlhfkit.losses.reward import bradley_terry_loss

__all__ = [
    "DPO_LOSSES",
    "REFERENCE_FREE",
    "PairLogps",
    "bradley_terry_loss",
    "hinge_loss",
    "ipo_loss",
    "kto_kl_estimate",
    "kto_loss",
    "orpo_loss",
    "ppo_policy_loss",
    "robust_loss",
    "sigmoid_loss",
    "simpo_loss",
    "value_loss",
]
