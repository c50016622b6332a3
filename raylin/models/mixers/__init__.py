"""Sequence mixers that replace attention modules: Linformer, Mamba, Mamba2, Gated DeltaNet, bidirectional."""

from raylin.models.mixers.bidirectional import BidirectionalMixer, reverse_within_length
from raylin.models.mixers.gated_deltanet import GatedDeltaNetMixer, gated_deltanet_config
from raylin.models.mixers.linformer import LinformerProjection, LinformerSelfAttention, ProjectionNames
from raylin.models.mixers.mamba import MambaMixer, mamba_config
from raylin.models.mixers.mamba2 import Mamba2Mixer, mamba2_config

__all__ = [
    "BidirectionalMixer",
    "GatedDeltaNetMixer",
    "LinformerProjection",
    "LinformerSelfAttention",
    "Mamba2Mixer",
    "MambaMixer",
    "ProjectionNames",
    "gated_deltanet_config",
    "mamba2_config",
    "mamba_config",
    "reverse_within_length",
]
