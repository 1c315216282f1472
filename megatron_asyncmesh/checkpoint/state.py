"""Training state saved and loaded through Megatron-core's ``dist_checkpointing``
(torch_dist format).

Layout under ``--save DIR``::

    DIR/iter_0000100/            a complete checkpoint (Megatron's format)
    DIR/latest_checkpointed_iteration.txt

A checkpoint is written into ``iter_XXXXXXX.partial``; after every rank
finished writing, rank 0 adds ``asyncmesh_meta.json`` (format version, model
shape and layout, size and SHA-256 of every file), renames the directory and
then replaces the ``latest`` file atomically: an interrupted save never looks
complete, and the previous checkpoint stays the one that loads. Loading checks
the metadata, every checksum, the model shape and the layout before reading.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Dict, List, Optional, Tuple

import torch.distributed as dist

from megatron_asyncmesh.checkpoint.integrity import (
    LATEST, META, check_param_groups, checksum_files, data_parallel_size, iter_dir,
    latest_iteration_dir, verify, write_meta)
from megatron_asyncmesh.config import config_from_dict
from megatron_asyncmesh.model import unwrap_model
from megatron_asyncmesh.options import ConfigError


def saved_config(root: Optional[str]) -> Optional[dict]:
    """The run configuration recorded by the latest complete checkpoint under ``root``
    (None when there is none: :func:`load` reports what is wrong with it)."""
    try:
        path = latest_iteration_dir(root) if root else None
        if path is None:
            return None
        with open(os.path.join(path, META)) as f:
            return json.load(f).get("config")
    except (OSError, ValueError):
        return None


def _versions(cfg, model, model_sd, iteration: int,
              held: Optional[Dict[int, List]] = None,
              num_microbatches: Optional[int] = None) -> dict:
    """ShardedTensors of the older weight versions a no-flush pipeline resumes on, keyed
    by how many steps they lag (``pipeline.weights_back1.<param key>.<layer>``).
    Saving: ``held`` (``schedule.held_versions()``); loading: empty tensors for the
    versions ``schedule.resume_versions`` names."""
    import torch
    from megatron.core import parallel_state

    from megatron_asyncmesh.pipeline.schedule import resume_versions
    from megatron_asyncmesh.sharding import sharded_params, standalone, unique_key

    params = [p for p in model.parameters() if p.requires_grad]
    if held is None:
        versions = resume_versions(cfg.pipeline_schedule, cfg.pipeline_model_parallel_size,
                                   parallel_state.get_pipeline_model_parallel_rank(),
                                   num_microbatches, iteration)
        held = {v: [torch.empty_like(p) for p in params] for v in versions}
    by_param = sharded_params(model_sd)
    dp_rank = parallel_state.get_data_parallel_rank(with_context_parallel=True)
    out = {}
    for v, tensors in held.items():
        for i, (p, t) in enumerate(zip(params, tensors)):
            # Standalone tensors: only some stages hold versions, so a stacked (all
            # layers) tensor would be incomplete.
            key = unique_key(f"pipeline.weights_back{iteration - v}", by_param[id(p)])
            out[f"{iteration - v}.{i}"] = standalone(key, t, dp_rank)
    return out


def _per_replica(state: dict, ranks_per_replica: int) -> None:
    """Independent data-parallel replicas (``--dp-averaging sparse``) hold different
    weights and optimizer states; Megatron's sharded state dicts assume identical
    replicas and let data-parallel rank 0 write for all. Every sharded entry gets
    the replica in its key and is written by its replica's first rank (replicas of
    ``ranks_per_replica`` ranks: their copies are identical, a distributed optimizer's
    shards are disjoint and each written by its owner)."""
    from megatron.core import parallel_state
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace
    from megatron.core.dist_checkpointing.mapping import ShardedBase

    replica = parallel_state.get_data_parallel_rank(with_context_parallel=True) \
        // ranks_per_replica

    def own(value):
        if isinstance(value, ShardedBase):
            value.key = f"replica{replica}.{value.key}"
            rid = value.replica_id
            value.replica_id = ((*rid[:-1], rid[-1] % ranks_per_replica)
                                if isinstance(rid, tuple) else rid % ranks_per_replica)
        return value

    dict_list_map_inplace(own, state)


def _state(model, optimizer, scheduler, iteration: int, is_loading: bool,
           cfg=None, held: Optional[Dict[int, List]] = None,
           num_microbatches: Optional[int] = None, averager=None) -> dict:
    """``cfg`` is given for a no-flush pipeline: its schedule and weight versions are
    part of the checkpoint (see :func:`_versions` for ``held`` / ``num_microbatches``).
    ``averager``: sparse data-parallel averaging, whose pending averages and drift EMA
    are saved, and every replica's state under its own keys."""
    from megatron_asyncmesh.optim.soap import factor_sharded_state

    from megatron_asyncmesh.optim.builder import ready_to_load

    # The unwrapped GPTModel: its keys are the model's own (no DDP "module." prefix).
    model_sd = unwrap_model(model).sharded_state_dict()
    if is_loading:
        ready_to_load(optimizer)
    state = {
        "model": model_sd,
        # Megatron-LM's own choice for the distributed optimizer: each data-parallel rank
        # writes its shard (its default format, flattened ranges, cannot be written).
        "optimizer": optimizer.sharded_state_dict(
            model_sd, is_loading=is_loading,
            metadata={"distrib_optim_sharding_type": "dp_reshardable"}),
        "opt_param_scheduler": scheduler.state_dict(),
        "iteration": iteration,
    }
    factors = factor_sharded_state(optimizer, model_sd)
    if factors:                    # SOAP's Kronecker factors: not parameter-shaped
        state["optimizer_soap_factors"] = factors
    if cfg is not None:
        state["pipeline_schedule"] = cfg.pipeline_schedule
        weights = _versions(cfg, model, model_sd, iteration, held, num_microbatches)
        if weights:
            state["pipeline_weight_versions"] = weights
    if averager is not None:
        from megatron.core import parallel_state

        from megatron_asyncmesh.sharding import standalone

        stage = parallel_state.get_pipeline_model_parallel_rank()
        tp = parallel_state.get_tensor_model_parallel_world_size()
        where = f"stage{stage}" + (f".tp{parallel_state.get_tensor_model_parallel_rank()}"
                                   if tp > 1 else "")
        tensors = averager.state_template(iteration) if is_loading else averager.state_dict()
        # The replica's ranks hold the same averaging state (parts exchanged on save).
        state["dp_averaging"] = {k: standalone(f"dp_averaging.{where}.{k}", t,
                                               averager.part_index)
                                 for k, t in tensors.items()}
        state["dp_averaging_mode"] = "sparse"
        _per_replica(state, averager.parts)
    return state


def save(cfg, model, optimizer, scheduler, iteration: int,
         schedule=None, averager=None) -> str:
    """``schedule``: the asynchronous pipeline (drained), whose older weight versions
    are saved too; ``averager``: sparse data-parallel averaging (see :func:`_state`)."""
    from megatron.core import dist_checkpointing

    final = iter_dir(cfg.save, iteration)
    partial = final + ".partial"
    if dist.get_rank() == 0:
        os.makedirs(cfg.save, exist_ok=True)
        if os.path.exists(partial):
            shutil.rmtree(partial)
        os.makedirs(partial)
    dist.barrier()
    pipeline = dict(cfg=cfg, held=schedule.held_versions()) if schedule is not None else {}
    dist_checkpointing.save(_state(model, optimizer, scheduler, iteration, False,
                                   averager=averager, **pipeline), partial)
    _crash_point("after_shards", iteration)
    dist.barrier()
    files = checksum_files(partial)          # collective: each rank hashes its share
    if dist.get_rank() == 0:
        write_meta(partial, cfg, unwrap_model(model).vocab_size, iteration, files=files)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(partial, final)
        tmp = os.path.join(cfg.save, LATEST + ".tmp")
        with open(tmp, "w") as f:
            f.write(str(iteration))
        os.replace(tmp, os.path.join(cfg.save, LATEST))
        _keep_last(cfg.save, cfg.save_keep_last)
    dist.barrier()
    return final


def _crash_point(where: str, iteration: int) -> None:
    """Fault injection for the crash tests: ``ASYNCMESH_CRASH=<where>:<rank>:<iteration>``
    kills that rank with SIGKILL here (nothing runs after it, like a lost node)."""
    spec = os.environ.get("ASYNCMESH_CRASH")
    if spec and spec == f"{where}:{dist.get_rank()}:{iteration}":
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def complete_iterations(root: str) -> List[int]:
    out = []
    for name in os.listdir(root):
        if name.startswith("iter_") and not name.endswith(".partial") and \
                os.path.isfile(os.path.join(root, name, META)):
            out.append(int(name[len("iter_"):]))
    return sorted(out)


def _keep_last(root: str, keep: int) -> None:
    if keep > 0:
        for it in complete_iterations(root)[:-keep]:
            shutil.rmtree(iter_dir(root, it), ignore_errors=True)


def load(cfg, model, optimizer, scheduler,
         num_microbatches: Optional[int] = None, averager=None, reshard: bool = False,
         iteration_path: Optional[str] = None) -> Tuple[int, Dict[int, List]]:
    """Load the latest checkpoint under ``--load`` (or ``iteration_path``); return its
    iteration and, for a no-flush pipeline, the older weight versions to hand to the
    schedule (``schedule.restore_versions``). A weights-only checkpoint (imported)
    loads the model and starts at iteration 0. ``reshard``: the converter's load at
    another pipeline size."""
    from megatron.core import dist_checkpointing

    path = iteration_path or latest_iteration_dir(cfg.load)
    if path is None:
        raise ConfigError(f"--load {cfg.load!r}: no {LATEST} there, so no complete "
                          f"checkpoint to resume from.")
    meta = verify(path, cfg, unwrap_model(model).vocab_size, data_parallel_size(),
                  reshard=reshard)
    iteration = meta["iteration"]
    if meta.get("contents", "full") == "model":
        state = dist_checkpointing.load(
            {"model": unwrap_model(model).sharded_state_dict()}, path)
        unwrap_model(model).load_state_dict(state["model"])
        # The optimizer's fp32 main weights (bf16, ZeRO-1) and the outer step's anchor
        # were copied from the initial weights: without this the first step writes the
        # initial weights plus one update back over the imported ones.
        optimizer.reload_model_params()
        if averager is not None:
            averager.reset_anchor()
        return 0, {}
    pipeline = {}
    common = dist_checkpointing.load_common_state_dict(path)
    saved_dp = common.get("dp_averaging_mode", "none")
    if saved_dp != cfg.dp_averaging and iteration > 0:
        raise ConfigError(
            f"--load {cfg.load!r}: iteration {iteration} was saved by a --dp-averaging "
            f"{saved_dp} run and this one is --dp-averaging {cfg.dp_averaging}: "
            + ("sparse runs save one state per replica." if saved_dp == "sparse" else
               "synchronous runs save one state for all replicas, without pending averages.")
            + f" Resume with --dp-averaging {saved_dp}.")
    check_param_groups(f"--load {cfg.load!r}", cfg, config_from_dict(meta.get("config") or {}),
                       iteration)
    if cfg.pipeline_schedule != "flush":
        saved = common.get("pipeline_schedule", "flush")
        if saved != cfg.pipeline_schedule and iteration > 0:
            raise ConfigError(
                f"--load {cfg.load!r}: iteration {iteration} was saved by a "
                f"--pipeline-schedule {saved} run, which holds only the current weights; "
                f"--pipeline-schedule {cfg.pipeline_schedule} resumes on the previous step's "
                f"weights too. Resume with --pipeline-schedule {saved}, or from a checkpoint "
                f"of a {cfg.pipeline_schedule} run.")
        pipeline = dict(cfg=cfg, num_microbatches=num_microbatches)
    state = dist_checkpointing.load(
        _state(model, optimizer, scheduler, iteration, True, averager=averager, **pipeline),
        path)
    if averager is not None:
        averager.load_state_dict(state["dp_averaging"])
    unwrap_model(model).load_state_dict(state["model"])
    import torch

    from megatron_asyncmesh.optim.builder import finish_load

    with torch.no_grad():        # fp32 ZeRO-1 copies into views of the model's parameters
        optimizer.load_state_dict(state["optimizer"])
    finish_load(optimizer)
    if "optimizer_soap_factors" in state:
        from megatron_asyncmesh.optim.soap import load_factor_state

        load_factor_state(optimizer, unwrap_model(model).sharded_state_dict(),
                          state["optimizer_soap_factors"])
    scheduler.load_state_dict(state["opt_param_scheduler"])
    weights = state.get("pipeline_weight_versions", {})
    held: Dict[int, List] = {}
    for key in sorted(weights, key=lambda k: tuple(int(x) for x in k.split("."))):
        back = int(key.split(".")[0])          # "<steps back>.<parameter index>"
        held.setdefault(iteration - back, []).append(weights[key])
    return int(state["iteration"]), held
