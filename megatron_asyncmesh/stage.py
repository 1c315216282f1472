"""This rank's pipeline stage as training builds it: Megatron-core's GPT stage (with the
layout-independent initialisation) in Megatron's DDP, the optimizer with its stage-local
and error-feedback wrappers, the learning-rate schedule and the sparse averager. The
Megatron engine trains it; the checkpoint converter loads checkpoints into it."""

from __future__ import annotations

from megatron_asyncmesh.optim import builder as optim
from megatron_asyncmesh.optim.stage_local import make_optimizer_stage_local
from megatron_asyncmesh.dataparallel.megatron import build_averager, replica_process_groups, \
    wrap_ddp
from megatron_asyncmesh.dataparallel.replicas import replica_layout
from megatron_asyncmesh.model import build_gpt_stage, init_layout_independent, mixed_precision


def build_stage(cfg, vocab_size: int, num_microbatches: int):
    """This rank's stage as training runs it: the GPT stage in Megatron's DDP, the
    optimizer (with its stage-local / error-feedback wrappers), the LR schedule and
    the sparse averager (or None). Also used by the checkpoint converter."""
    from megatron.core import parallel_state
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    model = build_gpt_stage(cfg, vocab_size)
    init_layout_independent(model, cfg)
    model = wrap_ddp(cfg, mixed_precision(model, cfg))
    model.config.finalize_model_grads_func = finalize_model_grads
    model.config.no_sync_func = model.no_sync
    stage = parallel_state.get_pipeline_model_parallel_rank()
    gb = cfg.global_batch_size
    sparse = cfg.dp_averaging == "sparse"
    optimizer, opt_info = optim.build_optimizer(
        cfg, model, stage, cfg.pipeline_model_parallel_size, num_microbatches,
        pg_collection=replica_process_groups(cfg) if sparse else None)
    asynchronous = cfg.pipeline_schedule != "flush"
    if asynchronous:
        # Grad-norm / inf checks stay inside the stage (and the replica): no collective
        # across stages.
        make_optimizer_stage_local(optimizer, replica_layout(
            cfg.dp_ranks_per_replica).stage_replica_group if sparse else None)
    optimizer = optim.wrap_error_feedback(optimizer, model, cfg, opt_info)
    averager = build_averager(cfg, model, optimizer)
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=cfg.lr, min_lr=cfg.min_lr,
        lr_warmup_steps=cfg.lr_warmup_iters * gb,
        lr_decay_steps=(cfg.lr_decay_iters or cfg.train_iters) * gb,
        lr_decay_style=cfg.lr_decay_style, start_wd=cfg.weight_decay, end_wd=cfg.weight_decay,
        wd_incr_steps=cfg.train_iters * gb, wd_incr_style="constant")
    scheduler = optim.wrap_scheduler(scheduler, optimizer, cfg, opt_info)
    return model, optimizer, opt_info, scheduler, averager
