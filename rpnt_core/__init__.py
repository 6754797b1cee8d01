"""rpnt_core: the RPNT model, data, training, evaluation and checkpoints.

Public surface (stable names others build on)::

    from rpnt_core import RPNT, RPNTConfig, load_checkpoint

    model = RPNT(RPNTConfig.preset("small", n_channels=96))
    out = model(counts)                      # counts (B, T, N) → {"velocity": (B, T, D), "log_rates": (B, T, N), ...}
    state = model.init_state(batch_size=1)
    out_t, state = model.step(counts_t, state)   # counts_t (B, N): one bin, constant-size state
    model = load_checkpoint("model.safetensors")  # eval mode, never unpickles

Names are resolved lazily (PEP 562) so that light modules — the decoder contract, the CLI, the
data formats — can be imported without paying for ``import torch``.
"""

from __future__ import annotations

from .lazy import lazy_exports

_EXPORTS = {
    "RPNT": "rpnt_core.model.rpnt",
    "RPNTConfig": "rpnt_core.config",
    "ConfigError": "rpnt_core.config",
    "load_checkpoint": "rpnt_core.checkpoint",
    "save_checkpoint": "rpnt_core.checkpoint",
    "read_header": "rpnt_core.checkpoint",
    "Decoder": "rpnt_core.decoder",
    "DecoderInfo": "rpnt_core.decoder",
    "decode_stream": "rpnt_core.decoder",
    "TorchDecoder": "rpnt_core.model.torch_decoder",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
