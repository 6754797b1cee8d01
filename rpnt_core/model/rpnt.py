"""RPNT: the model.  One module, two ways to run it — full forward and ``step`` — same numbers.

Data flow (shapes for a single-site model; multi-site adds an S axis before T):

    counts (B, T, N) ─ sqrt ─ read-in Linear(N→d) ─ + metadata bias (B, 1, d)
        ─ L × TemporalBlock (causal band attention with context kernels)
        ─ LayerNorm ─┬─ rate head  MLP(d→d→N)  → log_rates (B, T, N)   (Poisson read-out)
                     └─ velocity head Linear(d→D) · scale + mean → velocity (B, T, D)

Multi-site (config.spatial_layers > 0): counts (B, S, T, N) with site_xy (B, S, 2) or (S, 2);
the temporal encoder runs per site (shared weights), then the spatial encoder attends across sites
at each time step (2-D rotary on site coordinates); log_rates stay per site (B, S, T, N), velocity
is read from the mean over sites (B, T, D).

Metadata (subject, session, task, date) is constant within a window, so it is *not* a rotary axis
(it would cancel in q·k): it enters as a learned bias vector added to every token — embeddings for
the categorical fields (index 0 = unknown) and Fourier features of the date through a linear map.

Streaming: ``init_state(batch_size)`` returns a flat ``dict[str, Tensor]`` of constant-size ring
buffers (the layout is ``state_shapes``; ``write_index`` is the slot the next bin is written to,
advancing modulo W); ``step(counts_t, state)`` runs one bin and returns the outputs for that bin
and the next state.  Nothing in the state counts stream position beyond that slot, so hours of
streaming neither grow memory nor change results.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from ..config import RPNTConfig
from .encoder import SpatialEncoder, TemporalBlock

META_FIELDS = ("subject", "session", "task")
N_DATE_FEATURES = 4  # Fourier frequencies of the date (periods 8, 32, 128, 512 days)


class RPNT(nn.Module):
    """The RPNT encoder with Poisson and velocity heads.

    ``RPNT(config)(counts, metadata=None)`` → ``{"velocity", "log_rates", "latent"}`` (plus
    ``"site_latent"`` and ``"connectivity"`` for multi-site models).  ``metadata`` is a mapping
    with optional ``subject``/``session``/``task`` (LongTensor (B,) vocabulary indices, see
    :meth:`metadata_for`) and ``date_days`` (FloatTensor (B,)).
    """

    def __init__(self, config: RPNTConfig) -> None:
        super().__init__()
        if not isinstance(config, RPNTConfig):
            raise TypeError(f"config: expected RPNTConfig, got {type(config).__name__}")
        self.config = c = config
        self.read_in = nn.Linear(c.n_channels, c.d_model)
        self.meta_embed = nn.ModuleDict(
            {f: nn.Embedding(len(getattr(c, f + "s")) + 1, c.d_model) for f in META_FIELDS}
        )
        for emb in self.meta_embed.values():
            nn.init.normal_(emb.weight, std=0.02)
        self.date_proj = nn.Linear(2 * N_DATE_FEATURES, c.d_model) if c.use_date else None
        self.blocks = nn.ModuleList(TemporalBlock(c) for _ in range(c.n_layers))
        self.norm = nn.LayerNorm(c.d_model)
        self.spatial = SpatialEncoder(c) if c.spatial_layers else None
        self.rate_trunk = nn.Sequential(nn.Linear(c.d_model, c.d_model), nn.GELU())
        self.rate_out = nn.Linear(c.d_model, c.n_channels)
        self.velocity_head = nn.Linear(c.d_model, c.n_outputs)
        self.register_buffer("velocity_mean", torch.zeros(c.n_outputs))
        self.register_buffer("velocity_scale", torch.ones(c.n_outputs))
        if c.input_norm:  # identity until set_input_normalisation (see RPNTConfig.input_norm)
            self.register_buffer("input_mean", torch.zeros(c.n_channels))
            self.register_buffer("input_scale", torch.ones(c.n_channels))
        if c.channel_map:
            self.register_buffer(
                "channel_index", torch.tensor(c.channel_map, dtype=torch.long), persistent=False
            )
        else:
            self.channel_index = None

    # ------------------------------------------------------------------ metadata
    def metadata_for(
        self,
        *,
        batch_size: int = 1,
        subject: str | None = None,
        session: str | None = None,
        task: str | None = None,
        date_days: float = 0.0,
    ) -> dict[str, Tensor]:
        """Metadata tensors for names in this model's vocabularies (unknown names → index 0)."""
        out: dict[str, Tensor] = {}
        for f, name in zip(META_FIELDS, (subject, session, task), strict=True):
            vocab = getattr(self.config, f + "s")
            i = vocab.index(name) + 1 if name in vocab else 0
            out[f] = torch.full((batch_size,), i, dtype=torch.long)
        out["date_days"] = torch.full((batch_size,), float(date_days))
        return out

    def metadata_bias(self, metadata: Mapping[str, Tensor] | None, batch_size: int) -> Tensor:
        """(B, d) bias added to every token of a window."""
        dev = self.read_in.weight.device
        metadata = metadata or {}
        bias = torch.zeros(batch_size, self.config.d_model, device=dev)
        for f in META_FIELDS:
            ids = metadata.get(f)
            ids = torch.zeros(batch_size, dtype=torch.long, device=dev) if ids is None else ids.to(dev).long()
            if ids.shape != (batch_size,):
                raise ValueError(f"metadata[{f!r}]: expected shape ({batch_size},), got {tuple(ids.shape)}")
            if ids.numel() and (ids.min() < 0 or ids.max() >= self.meta_embed[f].num_embeddings):
                raise ValueError(
                    f"metadata[{f!r}]: index out of range for a vocabulary of "
                    f"{self.meta_embed[f].num_embeddings - 1}"
                )
            bias = bias + self.meta_embed[f](ids)
        if self.date_proj is not None:
            date = metadata.get("date_days")
            date = torch.zeros(batch_size, device=dev) if date is None else date.to(dev).float()
            periods = 8.0 * 4.0 ** torch.arange(N_DATE_FEATURES, device=dev, dtype=torch.float32)
            ang = 2 * math.pi * date[:, None] / periods  # (B, F)
            bias = bias + self.date_proj(torch.cat([torch.sin(ang), torch.cos(ang)], dim=-1))
        return bias

    # ------------------------------------------------------------------ full forward
    def _check_counts(self, counts: Tensor, step: bool, n: int | None = None) -> None:
        c = self.config
        n = c.n_input_channels if n is None else n
        want = (2 if step else 3) + (1 if c.spatial_layers else 0)
        if counts.dim() != want or counts.shape[-1] != n:
            names = ("B", "S", "N") if c.spatial_layers else ("B", "N")
            if not step:
                names = names[:-1] + ("T", "N")
            raise ValueError(
                f"counts: expected shape ({', '.join(names)}) with N={n}, got {tuple(counts.shape)}"
            )

    def _site_xy(self, site_xy: Tensor | None, b: int, s: int) -> Tensor:
        if site_xy is None:
            raise ValueError("site_xy: required for a multi-site model (config.spatial_layers > 0)")
        xy = site_xy.to(self.read_in.weight.device).float()
        if xy.dim() == 2:
            xy = xy.unsqueeze(0).expand(b, -1, -1)
        if xy.shape != (b, s, 2):
            raise ValueError(f"site_xy: expected (S, 2) or (B, S, 2) with S={s}, got {tuple(site_xy.shape)}")
        return xy

    def units(self, counts: Tensor) -> Tensor:
        """Input counts (..., N_in) as the model's Poisson targets (..., N): through the channel map."""
        return counts if self.channel_index is None else counts.index_select(-1, self.channel_index)

    def _embed(
        self, counts: Tensor, adapter: nn.Module | None, norm: tuple[Tensor, Tensor] | None = None
    ) -> Tensor:
        """(..., N_in) counts → (..., d) token embeddings (before metadata).  With ``config.input_norm`` the sqrt counts are standardised by
        ``norm`` = (mean, scale) over the read-in's channels when given (pretraining: each
        recording's own statistics), else by the model's ``input_mean``/``input_scale``."""
        x = counts.float()
        if adapter is not None:
            return adapter.read_in(self._standardise(torch.sqrt(x), norm))
        return self.read_in(self._standardise(torch.sqrt(self.units(x)), norm))  # (..., d)

    def _standardise(self, s: Tensor, norm: tuple[Tensor, Tensor] | None) -> Tensor:
        """(..., N) sqrt counts, standardised per channel when ``config.input_norm`` (else as is)."""
        if not self.config.input_norm:
            return s
        mean, scale = norm if norm is not None else (self.input_mean, self.input_scale)
        return (s - mean.to(s.device)) / scale.to(s.device)

    def _heads(self, z: Tensor, adapter: nn.Module | None = None) -> dict[str, Tensor]:
        rate_out = self.rate_out if adapter is None else adapter.rate_out
        return {
            "log_rates": rate_out(self.rate_trunk(z)),
            "velocity": self.velocity_head(z) * self.velocity_scale + self.velocity_mean,
        }

    def forward(
        self,
        counts: Tensor,
        metadata: Mapping[str, Tensor] | None = None,
        *,
        site_xy: Tensor | None = None,
        start_position: int = 0,
        adapter: nn.Module | None = None,
        norm: tuple[Tensor, Tensor] | None = None,
    ) -> dict[str, Tensor]:
        """Outputs for every bin of a stream whose first bin is ``counts``' bin 0.

        Args:
            counts: spike counts of the stream.
            metadata: optional ``subject``/``session``/``task`` indices and ``date_days``, each (B,).
            site_xy: site coordinates of a multi-site model, (S, 2) or (B, S, 2).
            start_position: absolute position of bin 0 (the outputs do not depend on it beyond
                float rounding).
            adapter: pretraining with per-session read-ins: a module with ``read_in``
                (Linear(N_s → d)) and ``rate_out`` (Linear(d → N_s)) used instead of the model's own.
            norm: (mean, scale) of this recording's sqrt counts for ``config.input_norm`` models
                (see :meth:`_embed`); default the model's own statistics.

        Returns:
            ``velocity``, ``log_rates``, ``latent`` (multi-site: also ``site_latent``,
            ``connectivity``).

        Shape:
            counts (B, T, N) [(B, S, T, N)] → velocity (B, T, D), log_rates (B, T, N)
            [(B, S, T, N)], latent (B, T, d).

        Raises:
            ValueError: counts or metadata of the wrong shape.
        """
        self._check_counts(counts, step=False, n=None if adapter is None else adapter.read_in.in_features)
        multisite = self.config.spatial_layers > 0
        b = counts.shape[0]
        x = counts
        if multisite:
            s = x.shape[1]
            xy = self._site_xy(site_xy, b, s)
            x = x.flatten(0, 1)  # (B·S, T, N)
        h = self._embed(x, adapter, norm)  # (B', T, d)
        bias = self.metadata_bias(metadata, b)  # (B, d)
        if multisite:
            bias = bias.repeat_interleave(s, dim=0)
        h = h + bias[:, None, :]
        for blk in self.blocks:
            h = blk(h, start_position=start_position)
        z = self.norm(h)  # (B', T, d)
        if not multisite:
            return {"latent": z, **self._heads(z, adapter)}
        z = z.unflatten(0, (b, s))  # (B, S, T, d)
        z, fc = self.spatial(z, xy)
        out = self._heads(z, adapter)
        pooled = z.mean(dim=1)  # (B, T, d)
        out["velocity"] = self._heads(pooled)["velocity"]  # (B, T, D)
        out.update(latent=pooled, site_latent=z, connectivity=fc)
        return out

    @property
    def receptive_field(self) -> int:
        """Bins of input that an output can depend on: each layer reaches W − 1 bins back from each
        of its k_q − 1 past score rows, so L · (W + k_q − 2) + 1 bins including the current one."""
        c = self.config
        return c.n_layers * (c.window + c.kernel_q - 2) + 1

    @torch.no_grad()
    def predict_stream(
        self, counts: Tensor, metadata: Mapping[str, Tensor] | None = None, *, chunk: int = 1024
    ) -> dict[str, Tensor]:
        """Outputs for a whole stream (B, T, N), equal to running ``step`` from an empty state.

        Runs the full forward over chunks of ``chunk`` bins, each preceded by
        ``receptive_field − 1`` bins of the stream before it, keeping only the chunk's own outputs:
        exact, because no output depends on inputs further back (tested against ``step``).
        """
        if self.config.spatial_layers:
            raise ValueError("predict_stream: single-site models only")
        self._check_counts(counts, step=False)
        t = counts.shape[1]
        prefix = self.receptive_field - 1
        pieces: dict[str, list[Tensor]] = {}
        for c0 in range(0, t, chunk):
            c1 = min(t, c0 + chunk)
            s0 = max(0, c0 - prefix)
            out = self.forward(counts[:, s0:c1], metadata)
            for k, v in out.items():
                pieces.setdefault(k, []).append(v[:, c0 - s0 :])
        return {k: torch.cat(v, dim=1) for k, v in pieces.items()}

    # ------------------------------------------------------------------ streaming
    def state_shapes(self, batch_size: int = 1, n_sites: int = 1) -> dict[str, tuple[int, ...]]:
        """Names and shapes of the streaming state, in a fixed order (ONNX I/O order)."""
        bb = batch_size * (n_sites if self.config.spatial_layers else 1)
        shapes: dict[str, tuple[int, ...]] = {
            "meta_bias": (bb, self.config.d_model),
            "valid": (bb, self.config.window),
            "write_index": (bb, 1),
        }
        for i, blk in enumerate(self.blocks):
            for name, shp in blk.attn.state_shapes(bb).items():
                shapes[f"layer{i}.{name}"] = shp
        if self.config.spatial_layers:
            shapes["site_xy"] = (batch_size, n_sites, 2)
        return shapes

    @torch.no_grad()
    def init_state(
        self,
        batch_size: int = 1,
        metadata: Mapping[str, Tensor] | None = None,
        *,
        site_xy: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Empty history for ``batch_size`` streams.  ``valid`` (float 0/1) marks filled slots."""
        dev = self.read_in.weight.device
        n_sites = 1
        if self.config.spatial_layers:
            if site_xy is None:
                raise ValueError("site_xy: required for a multi-site model (config.spatial_layers > 0)")
            n_sites = int(site_xy.shape[-2])
        state = {k: torch.zeros(s, device=dev) for k, s in self.state_shapes(batch_size, n_sites).items()}
        bias = self.metadata_bias(metadata, batch_size)
        state["meta_bias"] = bias.repeat_interleave(n_sites, dim=0) if self.config.spatial_layers else bias
        if self.config.spatial_layers:
            state["site_xy"] = self._site_xy(site_xy, batch_size, n_sites)
        return state

    def step(
        self, counts_t: Tensor, state: Mapping[str, Tensor]
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """One bin of the stream ``state`` continues.

        Args:
            counts_t: this bin's counts.
            state: the state :meth:`init_state` made or the previous ``step`` returned.

        Returns:
            (outputs for this bin, next state); the outputs equal the full forward's at this bin.

        Shape:
            counts_t (B, N) [(B, S, N)] → velocity (B, D), log_rates (B, N) [(B, S, N)], latent (B, d).
        """
        self._check_counts(counts_t, step=True)
        multisite = self.config.spatial_layers > 0
        x = counts_t
        if multisite:
            b, s = x.shape[:2]
            x = x.flatten(0, 1)  # (B·S, N)
        valid = torch.cat([torch.ones_like(state["valid"][:, :1]), state["valid"][:, :-1]], dim=1)  # (B', W)
        vbool = valid > 0.5
        h = self._embed(x, None) + state["meta_bias"]  # (B', d)
        ring = self.blocks[0].attn.ring(state["write_index"], vbool)  # shared by every layer
        nxt = state["write_index"] + 1  # the next slot, modulo W
        new: dict[str, Tensor] = {
            "meta_bias": state["meta_bias"],
            "valid": valid,
            "write_index": torch.where(nxt >= self.config.window, torch.zeros_like(nxt), nxt),
        }
        for i, blk in enumerate(self.blocks):
            prefix = f"layer{i}."
            cache = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            h, cache = blk.step(h, cache, vbool, ring)
            new.update({prefix + k: v for k, v in cache.items()})
        z = self.norm(h)  # (B', d)
        if not multisite:
            return {"latent": z, **self._heads(z)}, new
        new["site_xy"] = state["site_xy"]
        z, _ = self.spatial(z.unflatten(0, (b, s)), state["site_xy"])  # (B, S, d)
        out = self._heads(z)
        pooled = z.mean(dim=1)
        out["velocity"] = self._heads(pooled)["velocity"]
        out["latent"] = pooled
        return out, new

    # ------------------------------------------------------------------ finetuning helpers
    def set_velocity_normalisation(self, mean: Tensor, scale: Tensor) -> None:
        """Targets are learned z-scored; outputs come back in the target's units."""
        with torch.no_grad():
            self.velocity_mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
            self.velocity_scale.copy_(torch.as_tensor(scale, dtype=torch.float32))

    def set_input_normalisation(self, mean: Tensor, scale: Tensor) -> None:
        """Per-channel statistics of sqrt counts (``config.input_norm`` models only)."""
        if not self.config.input_norm:
            raise ValueError("input_norm: this model was built without input normalisation")
        with torch.no_grad():
            self.input_mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
            self.input_scale.copy_(torch.as_tensor(scale, dtype=torch.float32))

    def trainable_for(self, mode: str, *, last_layers: int = 1, read_in: bool = False) -> list[nn.Parameter]:
        """Parameters trained in finetuning ``mode``: "head" (velocity head only), "last" (head,
        final norm and the last ``last_layers`` blocks), "full" (everything).  ``read_in`` adds
        the read-in (a fresh per-session read-in is always trained)."""
        if mode == "full":
            return list(self.parameters())
        params = list(self.velocity_head.parameters())
        if read_in:
            params += list(self.read_in.parameters())
        if mode == "head":
            return params
        if mode == "last":
            params += list(self.norm.parameters())
            for blk in list(self.blocks)[-last_layers:]:
                params += list(blk.parameters())
            return params
        raise ValueError(f"mode: expected 'head', 'last' or 'full', got {mode!r}")
