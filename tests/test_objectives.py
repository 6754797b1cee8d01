"""Pretraining objective: masks, masking honesty, Poisson NLL, site contrast."""

from __future__ import annotations

import math

import pytest
import torch

from rpnt_core.train.objectives import (
    apply_mask,
    masked_poisson_nll,
    sample_mask,
    site_contrastive_loss,
    velocity_mse,
)


def test_masked_poisson_nll_closed_form():
    lr = torch.tensor([[0.0, math.log(2.0)], [math.log(3.0), 0.5]])
    y = torch.tensor([[1.0, 4.0], [0.0, 2.0]])
    mask = torch.tensor([[True, True], [False, False]])
    # exp(λ) − yλ on the two masked entries: (1 − 0) and (2 − 4 ln 2)
    want = ((1.0 - 0.0) + (2.0 - 4 * math.log(2.0))) / 2
    assert masked_poisson_nll(lr, y, mask).item() == pytest.approx(want, rel=1e-6)
    with pytest.raises(ValueError, match="no masked"):
        masked_poisson_nll(lr, y, torch.zeros_like(mask))


def test_mask_ratios_vary_across_batches_and_cover_the_range():
    g = torch.Generator().manual_seed(0)
    fractions = [sample_mask((4, 50, 40), generator=g).float().mean().item() for _ in range(200)]
    assert min(fractions) < 0.15 and max(fractions) > 0.85  # uniform ratios, not one fixed rate
    assert all(f > 0 for f in fractions)  # never an empty mask


def test_mask_structure_is_whole_channels_and_whole_bins():
    g = torch.Generator().manual_seed(1)
    m = sample_mask((3, 20, 10), generator=g)
    for b in range(3):
        chan = m[b].all(dim=0)  # channels masked at every bin
        time = m[b].all(dim=1)  # bins masked on every channel
        assert torch.equal(m[b], chan[None, :] | time[:, None])


def test_resampled_duplicates_are_masked_together():
    groups = torch.tensor([0, 1, 2, 0, 1, 2, 0])  # channel 0 appears three times
    g = torch.Generator().manual_seed(2)
    for _ in range(50):
        m = sample_mask((2, 8, 7), generator=g, groups=groups)
        for src in range(3):
            cols = m[..., groups == src]
            assert torch.equal(cols, cols[..., :1].expand_as(cols))


class CopyModel(torch.nn.Module):
    """Predicts each entry's rate from the input it is given at that entry (log(x + ½))."""

    def forward(self, counts):
        return torch.log(counts + 0.5)


def test_a_model_that_copies_its_input_cannot_lower_the_loss():
    g = torch.Generator().manual_seed(3)
    counts = torch.poisson(torch.rand(8, 30, 12, generator=g) * 6, generator=g)
    copy = CopyModel()
    for _ in range(20):
        mask = sample_mask(tuple(counts.shape), generator=g)
        seen = apply_mask(counts, mask)
        assert torch.all(seen[mask] == 0)  # the hidden entries really are hidden
        loss_copy = masked_poisson_nll(copy(seen), counts, mask)
        constant = masked_poisson_nll(torch.full_like(counts, math.log(0.5)), counts, mask)
        assert loss_copy.item() == pytest.approx(constant.item(), rel=1e-6)  # no better than a constant
        # whereas a leak would let copying win by a wide margin
        leaked = masked_poisson_nll(copy(counts), counts, mask)
        assert leaked.item() < loss_copy.item() - 0.5
        # and what the model sees does not depend on the hidden values at all
        other = counts.clone()
        other[mask] += 7
        assert torch.equal(apply_mask(other, mask), seen)


def test_site_contrast_prefers_site_specific_representations():
    g = torch.Generator().manual_seed(4)
    b, s, t, d = 6, 4, 5, 16
    site_codes = torch.randn(s, d, generator=g) * 3
    separated = site_codes[None, :, None, :] + 0.1 * torch.randn(b, s, t, d, generator=g)
    mixed = torch.randn(b, s, t, d, generator=g)
    assert site_contrastive_loss(separated) < site_contrastive_loss(mixed) - 1.0
    with pytest.raises(ValueError, match="contrast"):
        site_contrastive_loss(torch.randn(1, 3, 2, 4))


def test_velocity_mse_is_in_zscored_units():
    mean, scale = torch.tensor([1.0, -2.0]), torch.tensor([2.0, 0.5])
    target = torch.zeros(3, 2)
    pred = target + scale  # one standard deviation off in each dim
    assert velocity_mse(pred, target, mean=mean, scale=scale).item() == pytest.approx(1.0)


def test_mean_rate_reference_loss_closed_form():
    """Channels that fire a constant count c: the mean-rate predictor's masked NLL is exactly
    c − c·ln c on every masked entry, whatever the masks (and a session of two levels averages them)."""
    import numpy as np

    from rpnt_core.data.session import Session
    from rpnt_core.train.pretrain_loss import mean_rate_val_loss
    from rpnt_core.train.streams import prepare_streams

    c = 3.0
    s = Session(counts=np.full((400, 6), c, dtype=np.int64), velocity=None, bin_s=0.02, session="flat")
    streams = prepare_streams(
        [s], val_fraction=0.2, channels="readin", n_max=6, split_sites=True, seed=0, min_bins=40
    )
    assert mean_rate_val_loss(streams, window_len=40, seed=0) == pytest.approx(
        c - c * math.log(c + 1e-6), rel=1e-5
    )


def test_poisson_read_outs_start_at_the_mean_rates():
    import numpy as np
    from conftest import tiny_config

    from rpnt_core import RPNT
    from rpnt_core.data.session import Session
    from rpnt_core.train.pretrain_net import SessionAdapter, init_rate_biases
    from rpnt_core.train.streams import prepare_streams

    rng = np.random.default_rng(0)
    sessions = [
        Session(counts=rng.poisson(lam, (300, n)), velocity=None, bin_s=0.02, session=f"s{i}")
        for i, (lam, n) in enumerate([(0.5, 4), (2.0, 6)])
    ]
    cfg = tiny_config()
    for channels in ("readin", "resample"):
        streams = prepare_streams(
            sessions,
            val_fraction=0.2,
            channels=channels,
            n_max=cfg.n_channels,
            split_sites=True,
            seed=0,
            min_bins=20,
        )
        core = RPNT(cfg)
        adapters = (
            {st.key: SessionAdapter(st.n_channels, cfg.d_model) for st in streams}
            if channels == "readin"
            else None
        )
        init_rate_biases(core, streams, adapters)
        want = [torch.log(st.counts[: st.train[1]].mean(0) + 1e-3) for st in streams]
        if adapters:
            for st, w in zip(streams, want, strict=True):
                assert torch.allclose(adapters[st.key].rate_out.bias, w)
        else:
            assert torch.allclose(core.rate_out.bias, torch.stack(want).mean(0))
