"""AsyncMesh for DeepSpeed users: sparse averaging plugged into a DeepSpeed engine.

DeepSpeed 0.19.8 has no gradient-communication hook (1-bit Adam, which had the
pattern, is gone). The pattern it used is kept: the engine's backward
all-reduce across replicas is switched off (``engine.enable_backward_allreduce
= False`` under ZeRO-0; a one-rank data-parallel group under ZeRO-1) and
the communication runs after the optimizer step, here as a wrapper around
``engine.step()`` that calls :meth:`SparseAverager.step` whenever the engine
applied an optimizer step (``engine.was_step_applied()``)::

    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg,
                                      mpu=ReplicaMPU())         # ZeRO-1 only
    averager = attach_sparse_averaging(engine, AveragingConfig(fraction=0.05, delay=10))
    ...
    engine.backward(loss); engine.step()       # averaging happens inside step()

ZeRO stages:

- 0: every rank holds the whole model; the averager works on the module's
  parameters (fp32 training).
- 1: optimizer states are sharded over DeepSpeed's data-parallel group. The
  replicas sparse averaging keeps apart would then each update only a slice
  of the model, so the engine must be built with ``mpu=ReplicaMPU()``: its
  data-parallel group is the replica (this rank). The averager works on
  ZeRO-1's fp32 master partition (one flat tensor per parameter group) and
  copies it into the module's weights afterwards, so bf16 works too. The
  engine's gradient "all-reduce" stays on there: it is how ZeRO-1 fills its
  partition's gradients, and over a one-rank group it sends nothing.
- 2 and 3 are refused: ZeRO-2 reduce-scatters gradients from backward hooks
  inside its optimizer, which ``enable_backward_allreduce`` does not switch
  off, and each rank keeps only its slice of the gradient; ZeRO-3 also keeps
  only a slice of every parameter, so there are no whole replicas to
  average. Both assume the synchronous gradient exchange AsyncMesh removes.
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_asyncmesh import patching
from megatron_asyncmesh.dataparallel.averaging import AveragingConfig, AveragingError, \
    SparseAverager

DS_PATCH = patching.declare(
    "deepspeed-engine-averaging", package="deepspeed",
    target="`enable_backward_allreduce` (ZeRO-0) and `step` of a `DeepSpeedEngine` instance",
    replacement="False, and a wrapper that runs the sparse averaging after each applied "
                "optimizer step (`engine.was_step_applied()`)",
    why="DeepSpeed 0.19.8 has no communication hook; this is how 1-bit Adam plugged in",
    when="`attach_sparse_averaging(engine, ...)` (train_deepspeed --dp-averaging sparse)")


class ReplicaMPU:
    """DeepSpeed ``mpu`` whose data-parallel group is the replica: this rank alone by
    default, or ``group`` (the replica's ``ranks``, ``--dp-ranks-per-replica R``), over
    which ZeRO-1 then shards and all-reduces gradients; the model-parallel group is
    this rank alone (no tensor parallelism on the DeepSpeed path)."""

    def __init__(self, group=None, ranks=None):
        import torch.distributed as dist

        self.rank = dist.get_rank()
        self.alone, _ = dist.new_subgroups(group_size=1)
        self.group = group if group is not None else self.alone
        self.ranks = list(ranks) if ranks is not None else [self.rank]

    def get_data_parallel_group(self):
        return self.group

    def get_data_parallel_group_ranks(self):
        return self.ranks

    def get_data_parallel_world_size(self):
        return len(self.ranks)

    def get_data_parallel_rank(self):
        return self.ranks.index(self.rank)

    def get_model_parallel_group(self):
        return self.alone

    get_tensor_model_parallel_group = get_model_parallel_group

    def get_model_parallel_world_size(self):
        return 1

    def get_model_parallel_rank(self):
        return 0

    get_tensor_model_parallel_rank = get_model_parallel_rank

    def get_tensor_model_parallel_src_rank(self):
        return self.rank


def _engine_parameters(engine, names: Optional[dict], ranks_per_replica: int = 1):
    """``(params, after_apply)``: what the averager reads and writes for this ZeRO stage.
    ZeRO-1 over a replica of R ranks: this rank's fp32 partition (one R-th of the model,
    the same one on every replica's rank at this position), and after the averages are
    written the replica's ranks all-gather their bf16/fp32 partitions, as ZeRO-1's own
    step does."""
    stage = engine.zero_optimization_stage()
    if stage == 0:
        if engine.bfloat16_enabled() or engine.fp16_enabled():
            raise AveragingError(
                "sparse averaging with ZeRO stage 0 needs fp32 training (the fp32 master "
                "weights of bf16/fp16 live inside DeepSpeed's optimizer); use ZeRO stage 1 "
                "with mpu=ReplicaMPU() for bf16/fp16.")
        module = engine.module
        names = names or {n: n for n, _ in module.named_parameters()}
        return [(names[n], p) for n, p in module.named_parameters() if p.requires_grad], None
    opt = engine.optimizer
    if engine.dp_world_size != ranks_per_replica:
        raise AveragingError(
            f"sparse averaging with ZeRO stage 1 needs the engine's data-parallel group to be "
            f"the replica ({ranks_per_replica} rank(s)), got {engine.dp_world_size} ranks: "
            f"ZeRO-1 would shard the optimizer state over the replicas that averaging keeps "
            f"independent. Build the engine with deepspeed.initialize(..., mpu=ReplicaMPU("
            f"replica_group, replica_ranks)).")
    masters = opt.single_partition_of_fp32_groups
    params = [(f"zero1.group{i}", m) for i, m in enumerate(masters)]

    def after_apply() -> None:
        import torch.distributed as dist
        from deepspeed.runtime.utils import all_gather_dp_groups

        with torch.no_grad():
            for i, master in enumerate(masters):
                mine = dist.get_rank(group=opt.real_dp_process_group[i])
                part = opt.parallel_partitioned_bit16_groups[i][mine]
                part.copy_(master.to(part.dtype))
            if ranks_per_replica > 1:
                all_gather_dp_groups(
                    groups_flat=opt.bit16_groups_flat,
                    partitioned_param_groups=opt.parallel_partitioned_bit16_groups,
                    dp_process_group=opt.real_dp_process_group,
                    start_alignment_factor=opt.nccl_start_alignment_factor,
                    allgather_bucket_size=opt.allgather_bucket_size)

    return params, after_apply


def attach_sparse_averaging(engine, cfg: AveragingConfig, group=None,
                            names: Optional[dict] = None,
                            ranks_per_replica: int = 1) -> SparseAverager:
    """Switch ``engine``'s gradient all-reduce across replicas off and average after each
    optimizer step over ``group`` (default: the world, one replica per rank). Replicas
    of ``ranks_per_replica`` > 1 ranks need ZeRO-1 over the replica (``mpu=ReplicaMPU(
    replica_group, replica_ranks)``) and ``group`` = the ranks at this rank's position in
    every replica."""
    import deepspeed.comm as dscomm

    stage = engine.zero_optimization_stage()
    if stage >= 2:
        raise AveragingError(
            f"sparse averaging cannot be combined with ZeRO stage {stage}: ZeRO-2 reduce-"
            f"scatters gradients from backward hooks that enable_backward_allreduce does not "
            f"switch off and keeps only a slice of each gradient; ZeRO-3 keeps only a slice of "
            f"each parameter. Use ZeRO stage 0 or 1 (with mpu=ReplicaMPU()).")
    if ranks_per_replica > 1 and stage != 1:
        raise AveragingError(
            f"sparse averaging between replicas of {ranks_per_replica} ranks on a DeepSpeed "
            f"engine needs ZeRO stage 1 inside the replica (got stage {stage}): stage 0 "
            f"would all-reduce gradients over every rank. Use --zero-stage 1.")
    params, after_apply = _engine_parameters(engine, names, ranks_per_replica)
    averager = SparseAverager(params, cfg, group=group, comm=dscomm, after_apply=after_apply)
    note = cfg.overlap_note()
    if note and dscomm.get_rank() == 0:
        print(note, flush=True)
    if stage == 0:
        patching.replace(engine, "enable_backward_allreduce", False, patch=DS_PATCH,
                         label="DeepSpeedEngine.enable_backward_allreduce")
    # ZeRO-1 moves gradients into its fp32 partition inside that "all-reduce"; over the
    # replica group (ReplicaMPU) it stays inside the replica (one rank: sends nothing).
    step = engine.step

    def step_then_average(*args, **kwargs):
        out = step(*args, **kwargs)
        if engine.was_step_applied():
            averager.step()
        return out

    patching.replace(engine, "step", step_then_average, patch=DS_PATCH,
                     label="DeepSpeedEngine.step")
    engine.sparse_averager = averager
    return averager
