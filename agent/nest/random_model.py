"""Random-weight NEST checkpoints (`.nemo`) for tests and benchmarks.

They go through exactly the code a real checkpoint takes: NeMo builds the SSL
model from its config, `save_to` writes the `.nemo`, `restore_from` reads it.
"""
from __future__ import annotations

import os

import torch

from agent.nest.configs import nest_model_config


def build_random_nest(path: str, shape: str = "tiny", streaming: bool = False, seed: int = 0, **config_kwargs) -> str:
    """Write a randomly initialized NEST model (`shape` "tiny" or "large") to `path`."""
    from agent.nest.loading import _model_from_config

    torch.manual_seed(seed)
    model = _model_from_config(nest_model_config(shape, streaming=streaming, **config_kwargs))
    # Batch-norm running stats of a fresh model are 0/1: nudge them so a test that
    # mixes up train/eval mode or drops a buffer on save/load can see it.
    with torch.no_grad():
        for module in model.encoder.modules():
            if isinstance(module, torch.nn.BatchNorm1d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.9, 1.1)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    model.save_to(path)
    return path
