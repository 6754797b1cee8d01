"""The RPNT model: rotary embedding, context-kernel attention, encoders, heads."""

from .attention import ContextKernelAttention, conv_band
from .encoder import SpatialEncoder, TemporalBlock
from .rotary import MultiAxisRotary
from .rpnt import RPNT

__all__ = [
    "RPNT",
    "ContextKernelAttention",
    "conv_band",
    "MultiAxisRotary",
    "SpatialEncoder",
    "TemporalBlock",
]
