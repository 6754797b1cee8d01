"""Shared test fixtures.  Single-threaded BLAS keeps the suite fast and steady on 2 cores."""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
STEVENSON = SHARED_DATA / "stevenson2011_m1_centerout" / "StevensonV2.mat"
CONTDATA = SHARED_DATA / "contdata95_bme517" / "contdata95.mat"
SPIKE_WF = SHARED_DATA / "limblab_spike_wf_2012"  # 20 days of monkey Spike, binnedData MAT files


@pytest.fixture(autouse=True, scope="session")
def _torch_threads():
    try:
        import torch
    except ImportError:  # pragma: no cover
        yield
        return
    torch.set_num_threads(1)
    yield


def tiny_config(**kw):
    from rpnt_core import RPNTConfig

    base = dict(
        n_channels=7,
        n_outputs=2,
        d_model=16,
        n_layers=2,
        n_heads=2,
        window=6,
        kernel_q=3,
        kernel_k=3,
        kernel_hidden=8,
        ff_mult=2,
        dropout=0.0,
    )
    base.update(kw)
    return RPNTConfig(**base)


def randomise_kernels(model, std: float = 0.3) -> None:
    """Context kernels start near zero ('add' mode); make them matter for the tests."""
    import torch

    for blk in model.blocks:
        if hasattr(blk.attn, "kernel_mlp"):
            torch.nn.init.normal_(blk.attn.kernel_mlp[-1].weight, std=std)
            torch.nn.init.normal_(blk.attn.kernel_mlp[-1].bias, std=std)
