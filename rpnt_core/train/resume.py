"""Resumable training state in safetensors + JSON (no pickle): weights, optimiser, counters, RNGs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

from ..checkpoint import atomic_save_tensors

FORMAT = "rpnt-train-state/1"


def save_training_state(
    path: Path,
    *,
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    info: dict[str, Any],
    rng: np.random.Generator,
) -> None:
    tensors = {f"net.{k}": v for k, v in module.state_dict().items()}
    opt = optimizer.state_dict()
    for pid, st in opt["state"].items():
        for name, val in st.items():
            tensors[f"opt.{pid}.{name}"] = torch.as_tensor(val)
    tensors["rng.torch"] = torch.get_rng_state()
    header = {
        "format": FORMAT,
        "info": json.dumps(info),
        "param_groups": json.dumps(opt["param_groups"]),
        "numpy_rng": json.dumps(rng.bit_generator.state),
    }
    atomic_save_tensors(tensors, path, header)


def load_training_state(
    path: Path, *, module: torch.nn.Module, optimizer: torch.optim.Optimizer, rng: np.random.Generator
) -> dict[str, Any]:
    with safe_open(str(path), framework="pt") as f:
        header = f.metadata() or {}
        if header.get("format") != FORMAT:
            raise ValueError(f"resume: {path} is not an rpnt training state")
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - a safetensors handle: keys(), no iteration
    module.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
    state: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, pid, name = k.split(".", 2)
            state.setdefault(int(pid), {})[name] = v
    optimizer.load_state_dict({"state": state, "param_groups": json.loads(header["param_groups"])})
    torch.set_rng_state(tensors["rng.torch"])
    rng.bit_generator.state = json.loads(header["numpy_rng"])
    return json.loads(header["info"])
