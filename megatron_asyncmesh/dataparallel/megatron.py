"""AsyncMesh on Megatron-core: independent replicas, sparse averaging after each step.

Three pieces of a Megatron training loop, all here:

0. :func:`wrap_ddp`: Megatron's ``DistributedDataParallel`` for the run: the
   synchronous gradient all-reduce over data-parallel ranks, or (sparse) replicas.

1. :func:`replica_process_groups`: Megatron's ``DistributedDataParallel`` is
   built with a ``ProcessGroupCollection`` whose data-parallel group is this
   rank alone. Its gradient all-reduce becomes a no-op and its gradient
   scaling 1 (each replica's gradient is the mean over its own tokens); the
   pipeline groups are Megatron's. Nothing else in Megatron changes.
2. :func:`build_averager`: a :class:`SparseAverager` over the stage's real
   data-parallel group (``parallel_state.get_data_parallel_group()``), on the
   optimizer's main parameters (fp32 masters under bf16, the model's own
   parameters in fp32), keyed by layout-independent parameter names so every
   pipeline layout selects the same coordinates. The trainer calls its
   ``step()`` right after each stage's optimizer step, in every pipeline mode.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from megatron_asyncmesh.dataparallel.averaging import AveragingError, SparseAverager
from megatron_asyncmesh.dataparallel.config import averaging_config
from megatron_asyncmesh.model import global_parameter_names, unwrap_model
from megatron_asyncmesh.optim.main_params import copy_main_to_model, main_params
from megatron_asyncmesh.options import ConfigError


_singleton_groups: dict = {}


def replica_process_groups():
    """Megatron ProcessGroupCollection with a one-rank data-parallel group.

    Every rank takes part in creating every one-rank group (torch requires
    it), once per process.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.process_groups_config import ProcessGroupCollection

    if "mine" not in _singleton_groups:
        mine, _ = dist.new_subgroups(group_size=1)
        _singleton_groups["mine"] = mine
    alone = _singleton_groups["mine"]
    return ProcessGroupCollection(
        dp=alone, dp_cp=alone, expt_dp=alone,
        tp=parallel_state.get_tensor_model_parallel_group(),
        pp=parallel_state.get_pipeline_model_parallel_group(),
        ep=parallel_state.get_expert_model_parallel_group())


def wrap_ddp(cfg, model):
    """Megatron's DistributedDataParallel: contiguous grad buffers, DP all-reduce (none
    with ``--dp-averaging sparse``)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=cfg.use_distributed_optimizer,
        check_for_nan_in_grad=False,
    )
    pg_collection = None
    if cfg.dp_averaging == "sparse":
        # Independent replicas: DDP's data-parallel group is this rank alone, so its
        # gradient all-reduce is a no-op; the averaging runs after the optimizer step.
        pg_collection = replica_process_groups()
    return DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model,
                                   pg_collection=pg_collection)


def main_parameters(model, optimizer) -> Tuple[List[Tuple[str, torch.Tensor]], list]:
    """``(global name, main parameter)`` of every trainable parameter of this
    stage, plus the mixed-precision optimizers whose model copies must be
    refreshed after main parameters change."""
    module = unwrap_model(model)
    names = global_parameter_names(module)
    main_of, refresh = main_params(optimizer)
    params = [(names[n], main_of.get(id(p), p))
              for n, p in module.named_parameters() if p.requires_grad]
    return params, refresh


def build_averager(cfg, model, optimizer) -> Optional[SparseAverager]:
    """The stage's averager over its data-parallel group (None without sparse DP)."""
    acfg = averaging_config(cfg, cfg.seed, cfg.train_iters)
    if acfg is None:
        return None
    import deepspeed.comm as dscomm
    from megatron.core import parallel_state

    if not dscomm.is_initialized():
        dscomm.init_distributed(dist_backend=torch.distributed.get_backend(), verbose=False)
    params, refresh = main_parameters(model, optimizer)

    def after_apply() -> None:
        copy_main_to_model(refresh)

    try:
        return SparseAverager(params, acfg, group=parallel_state.get_data_parallel_group(),
                              comm=dscomm, after_apply=after_apply if refresh else None)
    except AveragingError as exc:
        raise ConfigError(str(exc)) from None
