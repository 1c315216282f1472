"""Keep an optimizer's gradient statistics inside its pipeline stage.

Megatron reduces the gradient norm (for clipping), the inf/nan flag and the zero count
over every pipeline stage inside ``optimizer.step()``; under an asynchronous pipeline
that collective would make the stages wait for each other every step.
"""

from __future__ import annotations

from megatron_asyncmesh import patching

GROUP_PATCH = patching.declare(
    "stage-local-grad-stats", package="megatron-core",
    target="optimizer instance attribute `grad_stats_parallel_group` (each optimizer of a "
           "`ChainedOptimizer`)",
    replacement="the stage's TP group (plain optimizer) or TP x DP group "
                "(`DistributedOptimizer`)",
    why="Megatron reduces grad norm / inf flags over all pipeline stages inside "
        "`optimizer.step()`; that collective would re-synchronise the pipeline",
    when="`make_optimizer_stage_local(optimizer)`: asynchronous pipeline schedules")
LAYER_WISE_PATCH = patching.declare(
    "stage-local-layer-wise", package="megatron-core",
    target="instance methods `get_grad_norm`, `_get_grad_norm_for_group`, "
           "`has_grad_norm_group`, `count_zeros` of a `LayerWiseDistributedOptimizer`",
    replacement="the same reductions over the stage's TP x DP group",
    why="Megatron hard-codes `group=None` (the whole world) there: a collective across "
        "pipeline stages in every step",
    when="`make_optimizer_stage_local(optimizer)` with the layer-wise optimizer, "
         "asynchronous pipeline only")


def make_optimizer_stage_local(optimizer, data_group=None) -> None:
    """Reduce gradient statistics (norm for clipping, inf/nan flag, zero count)
    inside this pipeline stage only.

    Megatron reduces them over the model-parallel group (TP x PP) for its
    plain optimizer and over every rank of the distributed-optimizer instance
    (DP x TP x PP) for ``DistributedOptimizer``: a collective across pipeline
    stages inside every optimizer step, which would make the pipeline
    synchronous again. Stage-local: the tensor-parallel group (plain) or the
    stage's tensor x data-parallel group (distributed, whose gradient shards
    live on the DP ranks). Clipping then uses the stage's own gradient norm,
    as PipeDream's per-stage optimizers do. ``data_group``: that tensor x data-parallel
    group when it is not Megatron's (a sparse run's replica).
    """
    from megatron.core import parallel_state
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.optimizer.layer_wise_optimizer import LayerWiseDistributedOptimizer

    if data_group is None:
        data_group = parallel_state.get_tensor_and_data_parallel_group(
            with_context_parallel=True)
    if isinstance(optimizer, LayerWiseDistributedOptimizer):
        _layer_wise_stage_local(optimizer, data_group)
        return
    inner = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    for opt in inner:
        if isinstance(opt, LayerWiseDistributedOptimizer):
            make_optimizer_stage_local(opt, data_group)
            continue
        if isinstance(opt, DistributedOptimizer):
            group = data_group
        else:
            group = parallel_state.get_tensor_model_parallel_group()
        patching.replace(opt, "grad_stats_parallel_group", group, patch=GROUP_PATCH,
                         label=f"{type(opt).__name__}.grad_stats_parallel_group")
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

    for name, fn in (("get_grad_norm", get_grad_norm),
                     ("_get_grad_norm_for_group", _get_grad_norm_for_group),
                     ("has_grad_norm_group", has_grad_norm_group), ("count_zeros", count_zeros),
                     ("grad_stats_parallel_group", group)):
        patching.replace(optimizer, name, fn, patch=LAYER_WISE_PATCH,
                         label=f"LayerWiseDistributedOptimizer.{name}")
