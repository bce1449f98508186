"""Losses: reward modelling (``reward``), PPO (``ppo``), the DPO family with KTO (``dpo``), and the
policy-loss variants GSPO and CISPO chosen by name (``policy``: ``POLICY_LOSSES``).

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
from rlhfkit.losses.policy import POLICY_LOSSES, cispo_policy_loss, gspo_policy_loss
from rlhfkit.losses.ppo import ppo_policy_loss, value_loss
from rlhfkit.losses.reward import bradley_terry_loss

__all__ = [
    "DPO_LOSSES",
    "POLICY_LOSSES",
    "REFERENCE_FREE",
    "PairLogps",
    "bradley_terry_loss",
    "cispo_policy_loss",
    "gspo_policy_loss",
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
