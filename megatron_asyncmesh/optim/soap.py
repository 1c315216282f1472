"""Basis rotation (Jung, Shin, Lee 2026) on emerging-optimizers' SOAP, with a stage-aware
eigenbasis refresh.

SOAP runs Adam in the eigenbasis of the Kronecker factors L = E[G G^T] and
R = E[G^T G]. ``emerging_optimizers.soap.SOAP`` (0.3) refreshes the basis
(one power iteration + QR, eigh at the first step) at every step.
:class:`StageAwareSOAP` keeps the factors' EMA at every step but refreshes the
basis only every ``precondition_frequency`` steps, the original SOAP's
schedule, and :func:`stage_refresh_frequency` gives earlier (staler) stages a
shorter period, the basis-rotation paper's stage-aware variant.

With ``precondition_frequency = 1`` the optimizer *is* the library's SOAP (the
reference test checks bitwise equality). On the other steps the library's
``update_eigenbasis_and_exp_avgs`` is replaced, for the duration of that one
``step()``, by the identity on (basis, moments): nothing of SOAP's update is
re-implemented here.
"""

from __future__ import annotations

import contextlib
import math

import torch
from emerging_optimizers.soap import soap as _soap_module
from emerging_optimizers.soap.soap import SOAP

from megatron_asyncmesh import patching


def _keep_basis(kronecker_factor_list, eigenbasis_list, exp_avg_sq, exp_avg, **_):
    return eigenbasis_list, exp_avg, exp_avg_sq


# Megatron's FP32Optimizer.sharded_state_dict shapes every optimizer state entry like its
# parameter; SOAP's Kronecker factors and eigenbases are (m x m) and (n x n).
FACTOR_KEYS = ("L", "R", "Q_L", "Q_R")


KEEP_BASIS_PATCH = patching.declare(
    "soap-refresh-period", package="emerging-optimizers",
    target="`emerging_optimizers.soap.soap.update_eigenbasis_and_exp_avgs` (module global)",
    replacement="identity on (basis, moments)",
    why="emerging-optimizers 0.3's SOAP refreshes the eigenbasis at every step and has no "
        "period argument; the Kronecker-factor EMA and the Adam update stay the library's",
    when="only during a `StageAwareSOAP.step()` that is not a refresh step")


def _basis_frozen():
    return patching.replaced(_soap_module, "update_eigenbasis_and_exp_avgs", _keep_basis,
                             patch=KEEP_BASIS_PATCH)


class StageAwareSOAP(SOAP):
    """SOAP whose eigenbasis is refreshed every ``precondition_frequency`` steps."""

    def __init__(self, params, lr: float, betas=(0.9, 0.95), shampoo_beta: float = 0.95,
                 eps: float = 1e-8, weight_decay: float = 0.01, *,
                 precondition_frequency: int = 1, **kwargs):
        if not isinstance(precondition_frequency, int) or precondition_frequency < 1:
            raise ValueError(
                f"precondition_frequency must be a positive integer, got "
                f"{precondition_frequency!r}.")
        super().__init__(params, lr, betas, shampoo_beta, eps, weight_decay, **kwargs)
        self.precondition_frequency = precondition_frequency

    def steps_taken(self) -> int:
        """Steps so far, from the per-parameter ``step`` counters (all parameters
        step together), so the refresh phase survives a checkpoint with no extra
        state."""
        for state in self.state.values():
            if "step" in state:
                return int(state["step"])
        return 0

    @torch.no_grad()
    def step(self, closure=None):
        frozen = self.steps_taken() % self.precondition_frequency != 0
        with _basis_frozen() if frozen else contextlib.nullcontext():
            return super().step(closure)

    def state_dict(self):
        """Without the factors (saved separately by :func:`factor_sharded_state`)."""
        sd = super().state_dict()
        sd["state"] = {k: {kk: vv for kk, vv in v.items() if kk not in FACTOR_KEYS}
                       for k, v in sd["state"].items()}
        return sd


def stage_refresh_frequency(base: int, stage_delay: float) -> int:
    """Refresh period of a stage whose gradients are ``stage_delay`` steps stale on
    average: ``base / (1 + delay)`` rounded up, at least 1. A delay-free stage
    (the last stage under ``stash``, every stage under ``flush``) keeps ``base``;
    a stage one step stale refreshes twice as often."""
    return max(1, math.ceil(base / (1.0 + stage_delay)))


# --- checkpointing ---------------------------------------------------------------------
# The factors left out of ``StageAwareSOAP.state_dict`` are saved as tensors of their own,
# keyed by the parameter's global checkpoint key, next to Megatron's state.



def _soap_optimizers(optimizer, sharded: bool = False):
    """(StageAwareSOAP, owned-by-one-rank) pairs inside a Megatron optimizer tree."""
    from megatron.core.optimizer.layer_wise_optimizer import LayerWiseDistributedOptimizer

    if isinstance(optimizer, StageAwareSOAP):
        yield optimizer, sharded
        return
    if isinstance(optimizer, LayerWiseDistributedOptimizer):
        sharded = True
    for child in getattr(optimizer, "chained_optimizers", None) or []:
        yield from _soap_optimizers(child, sharded)
    inner = optimizer.__dict__.get("optimizer") if hasattr(optimizer, "__dict__") else None
    if inner is not None and inner is not optimizer:
        yield from _soap_optimizers(inner, sharded)


def _factor_key(name: str, sharded_param) -> str:
    from megatron_asyncmesh.sharding import unique_key

    return unique_key(f"optimizer.soap.{name}", sharded_param)


def factor_sharded_state(optimizer, model_sharded_state_dict) -> dict:
    """ShardedTensors of every SOAP factor this rank holds (call after the optimizer's
    own ``sharded_state_dict``, which creates the state when loading)."""
    from megatron.core import parallel_state

    from megatron_asyncmesh.sharding import sharded_params, standalone

    by_param = sharded_params(model_sharded_state_dict)
    dp_rank = parallel_state.get_data_parallel_rank(with_context_parallel=True)
    out = {}
    for opt, owned in _soap_optimizers(optimizer):
        for group in opt.param_groups:
            for p in group["params"]:
                state = opt.state.get(p, {})
                for name in FACTOR_KEYS:
                    if name in state:
                        key = _factor_key(name, by_param[id(p)])
                        out[key] = standalone(key, state[name], 0 if owned else dp_rank)
    return out


def load_factor_state(optimizer, model_sharded_state_dict, loaded: dict) -> None:
    """Put loaded factors back (after the optimizer's ``load_state_dict``)."""
    from megatron_asyncmesh.sharding import sharded_params

    by_param = sharded_params(model_sharded_state_dict)
    for opt, _ in _soap_optimizers(optimizer):
        for group in opt.param_groups:
            for p in group["params"]:
                for name in FACTOR_KEYS:
                    key = _factor_key(name, by_param[id(p)])
                    if key in loaded:
                        opt.state[p][name] = loaded[key].clone().to(p.device)
