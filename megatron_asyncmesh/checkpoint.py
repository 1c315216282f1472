"""Checkpoints through Megatron-core's ``dist_checkpointing`` (torch_dist format).

Layout under ``--save DIR``::

    DIR/iter_0000100/            a complete checkpoint (Megatron's format)
    DIR/latest_checkpointed_iteration.txt

A checkpoint is written into ``iter_XXXXXXX.partial`` and renamed by rank 0
only after every rank finished writing, then the ``latest`` file is replaced
atomically: an interrupted save never looks complete, and the previous
checkpoint stays the one that loads.
"""

from __future__ import annotations

import os
import shutil

import torch.distributed as dist

from megatron_asyncmesh.config import ConfigError, TrainConfig

LATEST = "latest_checkpointed_iteration.txt"


def _iter_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def _state(model, optimizer, scheduler, iteration: int, is_loading: bool) -> dict:
    from megatron_asyncmesh.optim.soap import factor_sharded_state

    # The unwrapped GPTModel: its keys are the model's own (no DDP "module." prefix).
    model_sd = model.module.sharded_state_dict()
    state = {
        "model": model_sd,
        "optimizer": optimizer.sharded_state_dict(model_sd, is_loading=is_loading),
        "opt_param_scheduler": scheduler.state_dict(),
        "iteration": iteration,
    }
    factors = factor_sharded_state(optimizer, model_sd)
    if factors:                    # SOAP's Kronecker factors: not parameter-shaped
        state["optimizer_soap_factors"] = factors
    return state


def save(cfg: TrainConfig, model, optimizer, scheduler, iteration: int) -> str:
    from megatron.core import dist_checkpointing

    final = _iter_dir(cfg.save, iteration)
    partial = final + ".partial"
    if dist.get_rank() == 0:
        os.makedirs(cfg.save, exist_ok=True)
        if os.path.exists(partial):
            shutil.rmtree(partial)
        os.makedirs(partial)
    dist.barrier()
    dist_checkpointing.save(_state(model, optimizer, scheduler, iteration, False), partial)
    dist.barrier()
    if dist.get_rank() == 0:
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(partial, final)
        tmp = os.path.join(cfg.save, LATEST + ".tmp")
        with open(tmp, "w") as f:
            f.write(str(iteration))
        os.replace(tmp, os.path.join(cfg.save, LATEST))
    dist.barrier()
    return final


def load(cfg: TrainConfig, model, optimizer, scheduler) -> int:
    """Load the latest checkpoint under ``--load``; return its iteration."""
    from megatron.core import dist_checkpointing

    latest = os.path.join(cfg.load, LATEST)
    if not os.path.isfile(latest):
        raise ConfigError(f"--load {cfg.load!r}: no {LATEST} there, so no complete "
                          f"checkpoint to resume from.")
    with open(latest) as f:
        iteration = int(f.read().strip())
    path = _iter_dir(cfg.load, iteration)
    state = dist_checkpointing.load(_state(model, optimizer, scheduler, iteration, True), path)
    model.module.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if "optimizer_soap_factors" in state:
        from megatron_asyncmesh.optim.soap import load_factor_state

        load_factor_state(optimizer, model.module.sharded_state_dict(),
                          state["optimizer_soap_factors"])
    scheduler.load_state_dict(state["opt_param_scheduler"])
    return int(state["iteration"])
