"""AsyncMesh on Megatron-core: independent replicas, sparse averaging after each step.

Three pieces of a Megatron training loop, all here:

0. :func:`wrap_ddp`: Megatron's ``DistributedDataParallel`` for the run: the
   synchronous gradient all-reduce over data-parallel ranks, or (sparse) replicas.

1. :func:`replica_process_groups`: Megatron's ``DistributedDataParallel`` and
   optimizer are built with a ``ProcessGroupCollection`` whose data-parallel
   group is this rank's replica (``--dp-ranks-per-replica R`` ranks of the
   stage, see ``dataparallel.replicas``; this rank alone for R = 1). The
   gradient all-reduce, its scaling (each replica's gradient is the mean over
   its own tokens) and ZeRO-1 stay inside the replica; the pipeline groups are
   Megatron's. Nothing else in Megatron changes.
2. :func:`build_averager`: a :class:`SparseAverager` over the averaging group
   (the replicas' ranks holding the same parameters), on the
   optimizer's main parameters (fp32 masters under bf16, the model's own
   parameters in fp32), keyed by layout-independent parameter names so every
   pipeline layout selects the same coordinates. The trainer calls its
   ``step()`` right after each stage's optimizer step, in every pipeline mode.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from megatron_asyncmesh import distributed as mdist
from megatron_asyncmesh.dataparallel.averaging import AveragingError, SparseAverager
from megatron_asyncmesh.dataparallel.config import averaging_config
from megatron_asyncmesh.dataparallel.replicas import replica_layout
from megatron_asyncmesh.model import global_parameter_names, unwrap_model
from megatron_asyncmesh.optim.main_params import copy_main_to_model, main_params
from megatron_asyncmesh.options import ConfigError


def replica_process_groups(cfg):
    """Megatron ``ProcessGroupCollection`` of this rank's replica (``--dp-averaging
    sparse``): its data-parallel group is the replica's ranks of this stage
    (``--dp-ranks-per-replica R``; this rank alone for R = 1), so DDP's gradient
    all-reduce, gradient scaling and ZeRO-1 stay inside the replica; the distributed
    optimizer's gradient statistics span the whole replica (all its stages); the
    tensor, pipeline and model-parallel groups are Megatron's."""
    from megatron.core import parallel_state as ps
    from megatron.core.process_groups_config import ProcessGroupCollection

    layout = replica_layout(cfg.dp_ranks_per_replica)
    inner = layout.replica_group
    return ProcessGroupCollection(
        dp=inner, dp_cp=inner, intra_dp_cp=inner, expt_dp=inner, intra_expt_dp=inner,
        intra_dist_opt=layout.whole_replica_group, inter_dist_opt=None,
        tp=ps.get_tensor_model_parallel_group(), pp=ps.get_pipeline_model_parallel_group(),
        ep=ps.get_expert_model_parallel_group(), mp=ps.get_model_parallel_group(),
        tp_ep_pp=ps.get_expert_tensor_model_pipeline_parallel_group())


def wrap_ddp(cfg, model):
    """Megatron's DistributedDataParallel: contiguous grad buffers, DP all-reduce (inside
    the replica with ``--dp-averaging sparse``: none for one-rank replicas)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=cfg.use_distributed_optimizer,
        check_for_nan_in_grad=False,
    )
    pg_collection = None
    if cfg.dp_averaging == "sparse":
        # Independent replicas: DDP's data-parallel group is the replica, so its gradient
        # all-reduce stays inside it; the averaging runs after the optimizer step.
        pg_collection = replica_process_groups(cfg)
    return DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model,
                                   pg_collection=pg_collection)


def averaging_group(cfg):
    """The ranks the consensus model and the final average reduce over: the other
    replicas' ranks holding this rank's parameters (Megatron's data-parallel group when
    the run is synchronous)."""
    from megatron.core import parallel_state

    if cfg.dp_averaging != "sparse":
        return parallel_state.get_data_parallel_group()
    return replica_layout(cfg.dp_ranks_per_replica).averaging_group


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

    mdist.init_deepspeed_comm()
    params, refresh = main_parameters(model, optimizer)

    def after_apply() -> None:
        copy_main_to_model(refresh)

    layout = replica_layout(cfg.dp_ranks_per_replica)
    try:
        return SparseAverager(params, acfg, group=layout.averaging_group, comm=dscomm,
                              after_apply=after_apply if refresh else None,
                              replica_group=(layout.replica_group
                                             if layout.ranks_per_replica > 1 else None))
    except AveragingError as exc:
        raise ConfigError(str(exc)) from None
