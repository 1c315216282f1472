"""Asynchronous Nesterov (Ajanthan et al., ICML 2025): NAdam with decoupled weight decay.

The paper's method discounts the stale gradient by (1 - momentum) and
extrapolates along the momentum direction; its released code realises this as
PyTorch's NAdam with decoupled weight decay, beta1 = 0.99 and
``momentum_decay = 0.004``. :class:`NAdamW` is exactly that optimizer (the
reference tests compare it with ``torch.optim.NAdam`` through Megatron's
wrappers), plus the lazy state initialisation Megatron's checkpointing needs.

The paper's no-weight-stashing variant ("Ours-No-WS") keeps one weight version
and instead gives earlier (staler) stages a lower learning rate and a higher
momentum: beta1 rises from 0.9 at the last stage to 0.99 at the first.
:func:`stage_hyperparameters` computes that rule for a stage.
"""

from __future__ import annotations

from typing import Tuple

import torch

DEFAULT_BETAS = (0.99, 0.999)
DEFAULT_MOMENTUM_DECAY = 0.004


class NAdamW(torch.optim.NAdam):
    """``torch.optim.NAdam(decoupled_weight_decay=True)`` under a registry name."""

    def __init__(self, params, lr: float = 3e-4, betas: Tuple[float, float] = DEFAULT_BETAS,
                 eps: float = 1e-8, weight_decay: float = 0.01,
                 momentum_decay: float = DEFAULT_MOMENTUM_DECAY):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         momentum_decay=momentum_decay, decoupled_weight_decay=True,
                         foreach=False)

    @torch.no_grad()
    def init_state(self) -> None:
        """Create every parameter's state now (Megatron builds the checkpoint layout
        before the first step). Same tensors, dtypes and devices as NAdam's own lazy
        initialisation, so a step after this equals a step without it."""
        from torch.optim.optimizer import _get_scalar_dtype

        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                if state:
                    continue
                state["step"] = torch.tensor(0.0, dtype=_get_scalar_dtype())
                state["mu_product"] = torch.tensor(1.0, dtype=_get_scalar_dtype())
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    # NAdam keeps a scalar ``mu_product`` per parameter. Megatron's checkpointing shapes
    # every non-``step`` state entry like its parameter, so the scalar cannot be saved
    # as is; it is a pure function of the step count (the product of the momentum
    # schedule), so it is left out of the state dict and rebuilt on load with the same
    # float32 multiplications NAdam performs (bitwise equal, tested by resuming).
    def state_dict(self):
        sd = super().state_dict()
        sd["state"] = {k: {kk: vv for kk, vv in v.items() if kk != "mu_product"}
                       for k, v in sd["state"].items()}
        return sd

    def __setstate__(self, state) -> None:       # load_state_dict ends here
        for group in state.get("param_groups", []):
            beta1 = group["betas"][0]
            psi = group.get("momentum_decay", DEFAULT_MOMENTUM_DECAY)
            for p in group["params"]:
                p_state = state["state"].get(p)
                if p_state and "step" in p_state and "mu_product" not in p_state:
                    p_state["mu_product"] = mu_product(int(float(p_state["step"])), beta1, psi)
        super().__setstate__(state)


def mu_product(steps: int, beta1: float, momentum_decay: float) -> torch.Tensor:
    """NAdam's running product of mu_t = beta1 (1 - 0.5 * 0.96^(t psi)) for t = 1..steps."""
    from torch.optim.optimizer import _get_scalar_dtype

    out = torch.tensor(1.0, dtype=_get_scalar_dtype())
    for t in range(1, steps + 1):
        out *= beta1 * (1.0 - 0.5 * (0.96 ** (float(t) * momentum_decay)))
    return out


def init_state_fn(opt, config=None) -> None:
    """Megatron's ``init_state_fn`` hook (called before building a checkpoint)."""
    opt.init_state()


def stage_hyperparameters(stage: int, P: int, lr_min_fraction: float = 0.5,
                          beta1_first: float = 0.99, beta1_last: float = 0.9):
    """The no-stash rule: (lr multiplier, beta1) of ``stage`` out of ``P``.

    beta1 goes linearly from ``beta1_first`` (stage 0, the stalest) to
    ``beta1_last`` (stage P - 1, no delay); the learning rate from
    ``lr_min_fraction`` x lr at stage 0 up to lr at the last stage. With P = 1
    there is no delay and the stage gets (1.0, beta1_last).
    """
    if P == 1:
        return 1.0, beta1_last
    x = stage / (P - 1)               # 0 at the first stage, 1 at the last
    beta1 = beta1_first + (beta1_last - beta1_first) * x
    lr_mult = lr_min_fraction + (1.0 - lr_min_fraction) * x
    return lr_mult, beta1
