"""Install the asynchronous schedule into Megatron-core with one call.

    import megatron_asyncmesh
    schedule = megatron_asyncmesh.patch("2bw", train_iters=args.train_iters)
    optimizer = get_megatron_optimizer(...)
    megatron_asyncmesh.make_optimizer_stage_local(optimizer)

After ``patch``, ``megatron.core.pipeline_parallel.get_forward_backward_func()``
returns the ``AsyncPipelineSchedule`` (it reads the module globals
``forward_backward_pipelining_without_interleaving`` and
``forward_backward_no_pipelining`` at call time, which is what is replaced).
Nothing else in Megatron is modified; ``unpatch()`` restores both. What is
patched and the versions it was verified on: ``patches/README.md``.
"""

from __future__ import annotations

import logging
from typing import Optional

from megatron_asyncmesh.pipeline.runtime import AsyncPipelineSchedule

log = logging.getLogger(__name__)

VERIFIED_MEGATRON_CORE = ("0.19.2",)
_ORIGINALS: dict = {}
_ACTIVE: Optional[AsyncPipelineSchedule] = None
_NAMES = ("forward_backward_pipelining_without_interleaving", "forward_backward_no_pipelining")


def _check_version(allow_unverified: bool) -> None:
    from importlib.metadata import version

    found = version("megatron-core")
    if found not in VERIFIED_MEGATRON_CORE and not allow_unverified:
        raise RuntimeError(
            f"megatron-core {found} is installed; the asynchronous schedule was verified on "
            f"{', '.join(VERIFIED_MEGATRON_CORE)} (it relies on P2PCommunicator, forward_step, "
            "backward_step and get_forward_backward_func's module lookup). Install "
            "megatron-core==0.19.2 or pass allow_unverified=True and run tests/test_pipeline_*.")


def patch(mode: str, *, train_iters: Optional[int] = None, drain_interval: Optional[int] = None,
          start_step: int = 0, allow_unverified: bool = False) -> AsyncPipelineSchedule:
    """Make Megatron's get_forward_backward_func() return the ``mode`` schedule.

    ``train_iters`` drains the pipeline on the last step; ``drain_interval``
    every so many steps (e.g. the evaluation interval); or call
    ``schedule.request_drain()`` before the step preceding an evaluation or
    checkpoint. Returns the schedule object (for ``stats()`` and drains).
    """
    global _ACTIVE
    from megatron.core.pipeline_parallel import schedules

    _check_version(allow_unverified)
    unpatch()
    schedule = AsyncPipelineSchedule(mode, train_iters=train_iters,
                                     drain_interval=drain_interval, start_step=start_step)
    for name in _NAMES:
        _ORIGINALS[name] = getattr(schedules, name)
        setattr(schedules, name, schedule)
    _ACTIVE = schedule
    return schedule


def unpatch() -> None:
    global _ACTIVE
    from megatron.core.pipeline_parallel import schedules

    for name, fn in _ORIGINALS.items():
        setattr(schedules, name, fn)
    _ORIGINALS.clear()
    _ACTIVE = None


def megatron_schedule():
    """Megatron's own (synchronous) function for the current pipeline size."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import schedules

    name = _NAMES[0] if parallel_state.get_pipeline_model_parallel_world_size() > 1 else _NAMES[1]
    return _ORIGINALS.get(name, getattr(schedules, name))


def make_optimizer_stage_local(optimizer) -> None:
    """Reduce gradient statistics (norm for clipping, inf/nan flag, zero count)
    inside this pipeline stage only.

    Megatron reduces them over the model-parallel group (TP x PP) for its
    plain optimizer and over every rank of the distributed-optimizer instance
    (DP x TP x PP) for ``DistributedOptimizer``: a collective across pipeline
    stages inside every optimizer step, which would make the pipeline
    synchronous again. Stage-local: the tensor-parallel group (plain) or the
    stage's tensor x data-parallel group (distributed, whose gradient shards
    live on the DP ranks). Clipping then uses the stage's own gradient norm,
    as PipeDream's per-stage optimizers do.
    """
    from megatron.core import parallel_state
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.optimizer.layer_wise_optimizer import LayerWiseDistributedOptimizer

    if isinstance(optimizer, LayerWiseDistributedOptimizer):
        _layer_wise_stage_local(optimizer, parallel_state.get_tensor_and_data_parallel_group(
            with_context_parallel=True))
        return
    inner = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    for opt in inner:
        if isinstance(opt, LayerWiseDistributedOptimizer):
            make_optimizer_stage_local(opt)
            continue
        if isinstance(opt, DistributedOptimizer):
            group = parallel_state.get_tensor_and_data_parallel_group(with_context_parallel=True)
        else:
            group = parallel_state.get_tensor_model_parallel_group()
        opt.grad_stats_parallel_group = group
        if hasattr(opt, "_has_grad_norm_group_cache"):
            opt._has_grad_norm_group_cache = None


def _layer_wise_stage_local(optimizer, group) -> None:
    """``LayerWiseDistributedOptimizer`` reduces its statistics over the whole world
    (``group=None``), hard-coded in four methods. Each rank holds whole tensors of
    its own stage, so the stage's tensor x data-parallel group holds all of the
    stage's gradients: the same four reductions over that group, set on the
    instance (the class is untouched)."""
    import torch
    from megatron.core.optimizer.clip_grads import count_zeros_fp32, get_grad_norm_fp32
    from megatron.core.optimizer.optimizer import _get_param_grad_norm_group

    def grads(name=None):
        out = []
        for opt in optimizer.chained_optimizers:
            out += opt.get_grads_for_grad_norm(name) if name else opt.get_grads_for_grad_norm()
        return out

    def get_grad_norm():
        return get_grad_norm_fp32(grads(), grad_stats_parallel_group=group)

    def _get_grad_norm_for_group(name):
        return get_grad_norm_fp32(grads(name), grad_stats_parallel_group=group)

    def has_grad_norm_group(name):
        cache = optimizer.__dict__.setdefault("_stage_grad_norm_group_cache", {})
        if name not in cache:
            local = any(_get_param_grad_norm_group(p) == name
                        for opt in optimizer.chained_optimizers for p in opt.get_parameters())
            device = "cuda" if torch.cuda.is_available() else "cpu"
            flag = torch.tensor([int(local)], dtype=torch.int, device=device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=group)
            cache[name] = bool(flag.item())
        return cache[name]

    def count_zeros():
        params = [p for opt in optimizer.chained_optimizers for p in opt.get_parameters()]
        return count_zeros_fp32(params, grad_stats_parallel_group=group,
                                use_decoupled_grad=optimizer.config
                                .use_precision_aware_optimizer_no_fp8_or_ds_fp8)

    optimizer.get_grad_norm = get_grad_norm
    optimizer._get_grad_norm_for_group = _get_grad_norm_for_group
    optimizer.has_grad_norm_group = has_grad_norm_group
    optimizer.count_zeros = count_zeros
    optimizer.grad_stats_parallel_group = group
