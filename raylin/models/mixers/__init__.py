"""Sequence mixers that replace attention modules: Linformer, Mamba, Mamba2, Gated DeltaNet, bidirectional.

Each mixer file holds the module and its options class (raylin.models.mixers.options.MixerOptions);
raylin.models.plan.MIXER_KINDS names them.
"""

from raylin.models.mixers.bidirectional import BidirectionalMixer, reverse_within_length
from raylin.models.mixers.gated_deltanet import GatedDeltaNetMixer, GatedDeltaNetOptions, gated_deltanet_config
from raylin.models.mixers.linformer import LinformerOptions, LinformerProjection, LinformerSelfAttention
from raylin.models.mixers.mamba import MambaMixer, MambaOptions, mamba_config
from raylin.models.mixers.mamba2 import Mamba2Mixer, Mamba2Options, mamba2_config
from raylin.models.mixers.options import MixerOptions, ProjectionNames, TeacherShape

__all__ = [
    "BidirectionalMixer",
    "GatedDeltaNetMixer",
    "GatedDeltaNetOptions",
    "LinformerOptions",
    "LinformerProjection",
    "LinformerSelfAttention",
    "Mamba2Mixer",
    "Mamba2Options",
    "MambaMixer",
    "MambaOptions",
    "MixerOptions",
    "ProjectionNames",
    "TeacherShape",
    "gated_deltanet_config",
    "mamba2_config",
    "mamba_config",
    "reverse_within_length",
]
