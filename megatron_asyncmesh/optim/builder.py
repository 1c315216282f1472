"""Optimizers against gradient staleness, inside Megatron-core's optimizer stack.

``--optimizer`` picks one of:

========  ==========================================  =======================================
name      what                                         wrappers (why)
========  ==========================================  =======================================
adam      Megatron's AdamW (torch / TE / Apex)         replicated, ZeRO-1 ``DistributedOptimizer``,
                                                       layer-wise
sgd       Megatron's SGD                               replicated, ZeRO-1
nadamw    asynchronous Nesterov: NAdam, decoupled WD,  replicated, layer-wise. Element-wise, but
          beta1 0.99 (:mod:`.nadamw`)                  Megatron builds registry optimizers only
                                                       inside ``FP32Optimizer`` /
                                                       ``LayerWiseDistributedOptimizer``
muon      Megatron's ``TensorParallelMuon`` from       replicated, layer-wise. Newton-Schulz
          emerging-optimizers; AdamW for embeddings,   needs whole matrices: ZeRO-1 cuts tensors
          output layer, norms and biases               at arbitrary element boundaries
soap      emerging-optimizers' SOAP with a stage-      replicated, layer-wise (same reason: the
          aware eigenbasis refresh (:mod:`.soap`);     Kronecker factors need whole matrices)
          AdamW for non-matrix parameters
========  ==========================================  =======================================

``nadamw`` and ``soap`` are registered in Megatron-core 0.19's emerging-
optimizer registry (``megatron.core.optimizer.emerging_optimizers``) and built
by ``get_megatron_optimizer`` like Megatron's own Muon: the same parameter
groups (no weight decay on biases and norms), the same wrappers, gradient
clipping and ``sharded_state_dict``. Corrections that apply to any of them:
``--delay-error-feedback ALPHA`` (:class:`.feedback.DelayErrorFeedback`) and
``--pipemare-anneal-iters T`` (:class:`.feedback.PipeMareLR`).

Every stage knows its delay from the schedule (:func:`stage_delay`): nothing
is asked of the user.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron_asyncmesh import patching
from megatron_asyncmesh.optim.config import REGISTERED, check_choice
from megatron_asyncmesh.optim.feedback import DelayErrorFeedback, PipeMareLR
from megatron_asyncmesh.optim.main_params import leaf_optimizers
from megatron_asyncmesh.optim.nadamw import NAdamW, init_state_fn, stage_hyperparameters
from megatron_asyncmesh.pipeline.schedule import gradient_delay

REGISTRY_PATCH = patching.declare(
    "emerging-optimizer-registry", package="megatron-core",
    target="`megatron.core.optimizer.emerging_optimizers._EMERGING_OPTIMIZERS` (a dict)",
    replacement="two added entries, `asyncmesh_nadamw` and `asyncmesh_soap`, re-registered "
                "with the stage's hyperparameters; Megatron's own `muon` / `soap` untouched",
    why="the registry is how Megatron-core 0.19 builds non-Adam optimizers inside its "
        "wrappers (`FP32Optimizer`, `LayerWiseDistributedOptimizer`)",
    when="`build_optimizer` with --optimizer nadamw / soap")
LAYER_WISE_FP32_PATCH = patching.declare(
    "layer-wise-fp32-wrapping", package="megatron-core",
    target="`chained_optimizers` and `config` of a `LayerWiseDistributedOptimizer` instance",
    replacement="its per-rank torch optimizers wrapped in `FP32Optimizer`",
    why="0.19.2 wraps them in `Float16OptimizerWithFloat16Params` for bf16 and leaves them "
        "raw in fp32, so an fp32 run fails at the first step (no `prepare_grads`)",
    when="`build_optimizer` with --use-layer-wise-distributed-optimizer in fp32")

def stage_delay(mode: str, P: int, stage: int, M: int) -> float:
    """Mean gradient delay, in optimizer steps, of a steady-state step of ``stage``:
    the average over the step's M microbatches of (step applied - version used).
    flush: 0; 2bw: 1; stash: the fraction of microbatches whose forward ran
    before the previous step's update (up to (P-1-k)/M, more when M < P-1-k)."""
    if P == 1 or mode == "flush":
        return 0.0
    t = P + 2                              # past the warm-up: a steady step
    return sum(gradient_delay(mode, P, stage, M, t * M + i) for i in range(M)) / M


def describe_staleness(mode: str, P: int, M: int) -> str:
    """The start-up line naming every stage's mean gradient staleness (rank 0 prints it),
    with a hint when weight stashing leaves stage 0 more than half a step stale: there
    the gap to synchronous training grows (measured at P = 4, M = 4 against M = 8: the
    README's "More micro-batches"), and more micro-batches per step shrink it."""
    delays = [stage_delay(mode, P, k, M) for k in range(P)]
    line = (f"pipeline: {mode}, M = {M} micro-batches per step and replica; mean gradient "
            f"staleness per stage, in steps: {', '.join(f'{d:.3g}' for d in delays)}")
    if mode == "stash" and delays[0] > 0.5:
        line += (f"\n  stage 0 is {delays[0]:.3g} of a step stale: M >= 2P ({2 * P} here; a "
                 f"smaller --micro-batch-size or a larger --global-batch-size) keeps it "
                 f"under half a step")
    return line


@dataclass
class StageOptimizerInfo:
    """What the optimizer of this stage was built with (logged in summary.json)."""
    optimizer: str
    stage: int
    delay: float
    lr_mult: float = 1.0
    beta1: Optional[float] = None
    soap_refresh_every: Optional[int] = None
    error_feedback_alpha: float = 0.0
    pipemare_tau: Optional[float] = None
    muon_fp32_matmul_prec: Optional[str] = None

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}


def build_optimizer(cfg, model, stage: int, P: int, M: int, pg_collection=None):
    """Megatron optimizer for this stage's ``model`` (a DDP-wrapped GPTModel stage).
    ``pg_collection``: the process groups the model's DDP was built with (a sparse run's
    replica, whose ranks a distributed optimizer shards over); None: Megatron's.

    Returns ``(optimizer, info)``. Error feedback is applied by
    :func:`wrap_error_feedback` after the optimizer is made stage-local.
    """
    import torch
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    check_choice(cfg.optimizer, cfg.use_distributed_optimizer,
                 cfg.use_layer_wise_distributed_optimizer)
    delay = stage_delay(cfg.pipeline_schedule, P, stage, M)
    info = StageOptimizerInfo(cfg.optimizer, stage, delay)
    muon_prec = cfg.resolved_muon_fp32_matmul_prec()
    if cfg.optimizer == "muon":
        info.muon_fp32_matmul_prec = muon_prec
    name = cfg.optimizer
    if name in REGISTERED:
        name = REGISTERED[name]
        _register(cfg, info, P)
    opt_cfg = OptimizerConfig(
        optimizer=name, lr=cfg.lr, min_lr=cfg.min_lr, weight_decay=cfg.weight_decay,
        decoupled_lr=cfg.decoupled_lr, decoupled_min_lr=cfg.resolved_decoupled_min_lr(),
        adam_beta1=cfg.adam_beta1, adam_beta2=cfg.adam_beta2, adam_eps=cfg.adam_eps,
        sgd_momentum=cfg.sgd_momentum, clip_grad=cfg.clip_grad, bf16=cfg.bf16,
        params_dtype=torch.bfloat16 if cfg.bf16 else torch.float32,
        use_distributed_optimizer=cfg.use_distributed_optimizer,
        use_layer_wise_distributed_optimizer=cfg.use_layer_wise_distributed_optimizer,
        muon_momentum=cfg.muon_momentum, muon_nesterov=cfg.muon_nesterov,
        muon_split_qkv=cfg.muon_split_qkv, muon_extra_scale_factor=cfg.muon_extra_scale_factor,
        muon_fp32_matmul_prec=muon_prec,
        muon_scalar_optimizer="adam")
    if pg_collection is None:
        optimizer = get_megatron_optimizer(opt_cfg, [model])
    else:      # Megatron takes no gloo groups with an explicit collection
        optimizer = get_megatron_optimizer(opt_cfg, [model], pg_collection=pg_collection,
                                           use_gloo_process_groups=False)
    if cfg.use_layer_wise_distributed_optimizer and not cfg.bf16:
        _wrap_layer_wise_fp32(optimizer, opt_cfg)
    if info.lr_mult != 1.0:            # the scheduler reads each group's max_lr / min_lr
        for group in optimizer.param_groups:
            group["max_lr"] = group.get("max_lr", cfg.lr) * info.lr_mult
            group["min_lr"] = group.get("min_lr", cfg.min_lr) * info.lr_mult
    return optimizer, info


def _wrap_layer_wise_fp32(optimizer, opt_cfg) -> None:
    """Megatron-core 0.19.2's ``LayerWiseDistributedOptimizer`` wraps its per-rank torch
    optimizers in ``Float16OptimizerWithFloat16Params`` for bf16 and leaves them raw
    otherwise, so an fp32 run fails at the first step (``'...' object has no attribute
    'prepare_grads'``). Wrap them in ``FP32Optimizer`` (what Megatron uses for fp32
    everywhere else), after the sharding, as the bf16 path does."""
    import torch
    from megatron.core.optimizer import emerging_optimizers as eo
    from megatron.core.optimizer.layer_wise_optimizer import LayerWiseDistributedOptimizer
    from megatron.core.optimizer.optimizer import FP32Optimizer, MegatronOptimizer

    for lw in [optimizer, *getattr(optimizer, "chained_optimizers", [])]:
        if not isinstance(lw, LayerWiseDistributedOptimizer):
            continue
        wrapped = []
        for opt in lw.chained_optimizers:
            if not isinstance(opt, MegatronOptimizer):
                init = (init_state_fn if isinstance(opt, NAdamW) else
                        _adam_init_state_fn if isinstance(opt, (torch.optim.Adam,
                                                                torch.optim.AdamW)) else
                        eo._eopt_init_state_fn)
                opt = FP32Optimizer(opt, opt_cfg, init)
            wrapped.append(opt)
        patching.replace(lw, "chained_optimizers", wrapped, patch=LAYER_WISE_FP32_PATCH,
                         label="LayerWiseDistributedOptimizer.chained_optimizers")
        patching.replace(lw, "config", opt_cfg, patch=LAYER_WISE_FP32_PATCH,
                         label="LayerWiseDistributedOptimizer.config")


def _distributed_adams(optimizer):
    """The torch Adam / AdamW inside each of ``optimizer``'s ``DistributedOptimizer``s."""
    import torch
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for leaf in leaf_optimizers(optimizer):
        if isinstance(leaf, DistributedOptimizer) and \
                isinstance(leaf.optimizer, (torch.optim.Adam, torch.optim.AdamW)):
            yield leaf.optimizer


def ready_to_load(optimizer) -> None:
    """Before a checkpoint is read into ``optimizer``: Megatron's ``DistributedOptimizer``
    builds its loading template from its torch optimizer's state, which torch's Adam
    creates only at the first step (and Megatron's own init function leaves out
    ``step``, which the template asserts on without Transformer Engine or Apex). Give
    every such Adam its zero state first; the checkpoint overwrites it."""
    for adam in _distributed_adams(optimizer):
        _adam_init_state_fn(adam)


def finish_load(optimizer) -> None:
    """After a checkpoint was read into ``optimizer``: Megatron's ``DistributedOptimizer``
    records torch Adam's step count in its parameter groups, but the per-parameter
    ``step`` that torch's Adam reads for its bias correction keeps the template's
    value (0, see :func:`ready_to_load`), so the resumed run would take larger steps.
    Set it from the groups."""
    import torch

    for adam in _distributed_adams(optimizer):
        for group in adam.param_groups:
            if group.get("step") is None:
                continue
            for p in group["params"]:
                state = adam.state.get(p)
                if state and "step" in state:
                    state["step"] = torch.tensor(float(group["step"]))


def _adam_init_state_fn(opt, config=None) -> None:
    """State of every parameter before the first step, laid out as torch's Adam/AdamW
    lazily creates it (for a checkpoint written before the first step)."""
    import torch

    for group in opt.param_groups:
        for p in group["params"]:
            if not opt.state[p]:
                opt.state[p]["step"] = torch.tensor(0.0)
                opt.state[p]["exp_avg"] = torch.zeros_like(p)
                opt.state[p]["exp_avg_sq"] = torch.zeros_like(p)


def _register(cfg, info: StageOptimizerInfo, P: int) -> None:
    """(Re-)register this project's entries in Megatron's emerging-optimizer registry,
    with this stage's hyperparameters."""
    from megatron.core.optimizer import emerging_optimizers as eo

    if cfg.optimizer == "nadamw":
        beta1 = cfg.nadamw_beta1
        if cfg.nadamw_stage_aware:
            info.lr_mult, beta1 = stage_hyperparameters(info.stage, P)
        info.beta1 = beta1

        def nadamw_kwargs(config, model_chunks, pg_collection):
            return dict(lr=config.lr, betas=(beta1, cfg.nadamw_beta2), eps=config.adam_eps,
                        weight_decay=config.weight_decay,
                        momentum_decay=cfg.nadamw_momentum_decay)

        patching.replace_item(
            eo._EMERGING_OPTIMIZERS, REGISTERED["nadamw"], eo.EmergingOptimizerEntry(
                optimizer_cls=NAdamW, init_state_fn=init_state_fn,
                config_to_kwargs=nadamw_kwargs, default_param_overrides={}),
            patch=REGISTRY_PATCH, label=f"_EMERGING_OPTIMIZERS[{REGISTERED['nadamw']!r}]")
    elif cfg.optimizer == "soap":
        # emerging-optimizers pulls in torch.compile's stack (4 s per process here): only
        # the runs that use SOAP import it.
        from megatron_asyncmesh.optim.soap import StageAwareSOAP, stage_refresh_frequency

        every = cfg.soap_precondition_frequency
        if cfg.soap_stage_aware:
            every = stage_refresh_frequency(every, info.delay)
        info.soap_refresh_every = every

        def soap_kwargs(config, model_chunks, pg_collection):
            return dict(lr=config.lr, betas=(config.adam_beta1, config.adam_beta2),
                        shampoo_beta=cfg.soap_shampoo_beta, eps=config.adam_eps,
                        weight_decay=config.weight_decay, precondition_frequency=every,
                        fp32_matmul_prec="highest", qr_fp32_matmul_prec="highest")

        patching.replace_item(
            eo._EMERGING_OPTIMIZERS, REGISTERED["soap"], eo.EmergingOptimizerEntry(
                optimizer_cls=StageAwareSOAP, config_to_kwargs=soap_kwargs),
            patch=REGISTRY_PATCH, label=f"_EMERGING_OPTIMIZERS[{REGISTERED['soap']!r}]")


def wrap_error_feedback(optimizer, model, cfg, info: StageOptimizerInfo):
    """``--delay-error-feedback ALPHA``: alpha scaled by this stage's delay (a stage
    without delay gets none)."""
    if not cfg.delay_error_feedback:
        return optimizer
    info.error_feedback_alpha = cfg.delay_error_feedback * min(info.delay, 1.0)
    if not info.error_feedback_alpha:            # a delay-free stage: nothing to correct
        return optimizer
    return DelayErrorFeedback(optimizer, list(model.parameters()), info.error_feedback_alpha)


def wrap_scheduler(scheduler, optimizer, cfg, info: StageOptimizerInfo):
    """``--pipemare-anneal-iters T``: PipeMare's lr rescaling for this stage."""
    if not cfg.pipemare_anneal_iters:
        return scheduler
    info.pipemare_tau = 1.0 + info.delay
    return PipeMareLR(scheduler, optimizer, info.pipemare_tau, cfg.pipemare_anneal_iters,
                      cfg.global_batch_size)
