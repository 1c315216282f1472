"""Optimizer-agnostic corrections for delayed updates: error feedback and PipeMare.

Both wrap the Megatron-core objects the training loop already holds (the
``MegatronOptimizer`` and the ``OptimizerParamScheduler``) and change nothing
inside them, so they compose with every optimizer and wrapper.
"""

from __future__ import annotations

from typing import List, Optional

import torch

from megatron_asyncmesh.optim.main_params import copy_main_to_model, main_params


class DelayErrorFeedback:
    """Error feedback for a one-step-delayed update (ALGORITHMS.md 2.2, "ours").

    Under 2BW the update the inner optimizer produces at step t, ``u_t``, was
    computed on the weights of step t - 1. The wrapper applies, in addition,
    ``alpha (u_t - u_{t-1})``: the change between consecutive delayed updates,
    a first-order extrapolation of the update the current weights would have
    produced. With alpha = 0 it is plain 2BW:

        W(t+1) = W(t) + u_t + alpha (u_t - u_{t-1})

    ``u_t`` is measured as the change of the model's parameters across the
    inner ``step()`` (so it includes the learning rate, weight decay and
    whatever the wrapper does: replicated, layer-wise sharded or ZeRO-1),
    which keeps the wrapper free of any optimizer's internals. It costs two
    parameter-sized buffers: the previous update (state, checkpointed) and the
    pre-step copy (scratch, recycled). The first step has no previous update and is
    not corrected. Under ``--bf16`` the update is measured on, and the correction added
    to, the optimizer's fp32 main parameters, then copied into the bf16 model (on the
    model parameters it would be rounded away and overwritten by the next step's copy).
    """

    STATE_KEY = "delay_error_feedback"

    def __init__(self, optimizer, params: List[torch.nn.Parameter], alpha: float):
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"--delay-error-feedback must be in [0, 1], got {alpha}.")
        self.optimizer = optimizer
        self.alpha = alpha
        self.model_params = [p for p in params if p.requires_grad]
        main_of, self._refresh = main_params(optimizer)
        self.params = [main_of.get(id(p), p) for p in self.model_params]
        self.previous: Optional[List[torch.Tensor]] = None
        self._scratch: Optional[List[torch.Tensor]] = None

    def __getattr__(self, name):          # everything else is the inner optimizer's
        return getattr(self.__dict__["optimizer"], name)

    @torch.no_grad()
    def step(self):
        # Two parameter-sized buffers, recycled: ``previous`` (u_{t-1}) and a scratch
        # list that receives the pre-step weights, becomes u_t, and is then kept as
        # ``previous`` while the old ``previous`` becomes the next scratch.
        before = self._scratch or [torch.empty_like(p) for p in self.params]
        self._scratch = None
        for b, p in zip(before, self.params):
            b.copy_(p.detach())
        ok, grad_norm, zeros = self.optimizer.step()
        if not ok:
            self._scratch = before
            return ok, grad_norm, zeros
        for p, b in zip(self.params, before):
            b.neg_().add_(p.detach())          # b := u_t = W_after - W_before
        if self.previous is not None and self.alpha:
            for p, u, prev in zip(self.params, before, self.previous):
                p.data.add_(prev.neg_().add_(u), alpha=self.alpha)   # prev := u_t - u_{t-1}
            copy_main_to_model(self._refresh)
        self._scratch, self.previous = self.previous, before
        return ok, grad_norm, zeros

    # --- checkpointing through Megatron's sharded_state_dict -------------------
    def sharded_state_dict(self, model_sharded_state_dict, is_loading: bool = False, **kw):
        from megatron.core import parallel_state

        from megatron_asyncmesh.sharding import sharded_params, standalone, unique_key

        sd = self.optimizer.sharded_state_dict(model_sharded_state_dict, is_loading, **kw)
        by_param = sharded_params(model_sharded_state_dict)
        dp_rank = parallel_state.get_data_parallel_rank(with_context_parallel=True)
        buffers = self.previous if self.previous is not None else [
            torch.zeros_like(p) for p in self.params]
        # Standalone tensors (a stage without delay has no wrapper, so stacked per-layer
        # tensors would be incomplete); replicated over data-parallel ranks.
        stage = parallel_state.get_pipeline_model_parallel_rank()
        tp = parallel_state.get_tensor_model_parallel_rank()
        flag = torch.tensor([float(self.previous is not None)])
        sd[self.STATE_KEY] = {
            "has_previous": standalone(
                f"optimizer.{self.STATE_KEY}.has_previous.pp{stage}.tp{tp}", flag, dp_rank),
            "previous": {
                str(i): standalone(unique_key(f"optimizer.{self.STATE_KEY}", by_param[id(p)]),
                                   buf, dp_rank)
                for i, (p, buf) in enumerate(zip(self.model_params, buffers))}}
        return sd

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        mine = state_dict.pop(self.STATE_KEY, None)
        if mine is None:
            raise KeyError(
                f"the checkpoint has no {self.STATE_KEY!r} state: it was saved without "
                f"--delay-error-feedback; resume with the same optimizer flags.")
        self.optimizer.load_state_dict(state_dict)
        self.previous = ([mine["previous"][str(i)].clone() for i in range(len(self.params))]
                         if bool(mine["has_previous"].item()) else None)


class PipeMareLR:
    """PipeMare's learning-rate rescaling (Yang et al. 2021), per stage:

        lr_t = lr_sched(t) / tau ** (1 - min(t / T, 1))

    ``tau`` is 1 + the stage's mean gradient delay in optimizer steps (from the
    schedule), so a delay-free stage keeps its learning rate; ``T`` is the
    annealing length in steps. Wraps Megatron's ``OptimizerParamScheduler``:
    its ``step`` recomputes every group's lr, and this multiplies the result,
    so the correction never compounds and the scheduler's checkpoint state is
    unchanged.
    """

    def __init__(self, scheduler, optimizer, tau: float, anneal_steps: int, global_batch: int):
        if tau < 1.0:
            raise ValueError(f"PipeMare needs tau >= 1, got {tau}.")
        if anneal_steps < 1:
            raise ValueError(f"--pipemare-anneal-iters must be >= 1, got {anneal_steps}.")
        self.scheduler = scheduler
        self.optimizer = optimizer
        self.tau = tau
        self.anneal_steps = anneal_steps
        self.global_batch = global_batch
        self._apply()

    def __getattr__(self, name):
        return getattr(self.__dict__["scheduler"], name)

    def factor(self, step: int) -> float:
        return self.tau ** -(1.0 - min(step / self.anneal_steps, 1.0))

    def _apply(self) -> None:
        f = self.factor(self.scheduler.num_steps // self.global_batch)
        for group in self.optimizer.param_groups:
            group["lr"] = group["lr"] * f

    def step(self, increment: int) -> None:
        self.scheduler.step(increment=increment)
        self._apply()

    def load_state_dict(self, state_dict) -> None:
        self.scheduler.load_state_dict(state_dict)
        self._apply()
