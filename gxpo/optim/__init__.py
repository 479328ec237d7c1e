"""Optax combinators for lookahead policy updates; they know nothing of models or RL."""

from gxpo.optim.gate import GateState, ZScoreGate
from gxpo.optim.gxpo import GXPOInfo, GXPOState, adamw_direction, gxpo
from gxpo.optim.sfpo import SFPOInfo, SFPOState, sfpo

__all__ = [
    "GXPOInfo",
    "GXPOState",
    "GateState",
    "SFPOInfo",
    "SFPOState",
    "ZScoreGate",
    "adamw_direction",
    "gxpo",
    "sfpo",
]
