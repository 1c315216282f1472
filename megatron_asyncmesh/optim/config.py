"""The optimizer's options (``--optimizer`` and its hyperparameters, the learning-rate
schedule, clipping, the staleness corrections) and which combinations can run."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron_asyncmesh.options import ConfigError, check_choices, option

OPTIMIZERS = ("adam", "sgd", "nadamw", "muon", "soap")
MATRIX_WISE = ("muon", "soap")
REGISTERED = {"nadamw": "asyncmesh_nadamw", "soap": "asyncmesh_soap", "muon": "muon"}


class OptimizerChoiceError(ValueError):
    """An optimizer that cannot run with the chosen wrapper or schedule."""


def check_choice(optimizer: str, use_distributed_optimizer: bool,
                 use_layer_wise: bool) -> None:
    """Raise :class:`OptimizerChoiceError` for combinations that cannot run."""
    if optimizer not in OPTIMIZERS:
        raise OptimizerChoiceError(
            f"unknown --optimizer {optimizer!r}; choose one of {', '.join(OPTIMIZERS)}.")
    if use_distributed_optimizer and use_layer_wise:
        raise OptimizerChoiceError(
            "--use-distributed-optimizer and --use-layer-wise-distributed-optimizer are two "
            "ways to shard the optimizer over data-parallel ranks; pick one.")
    if use_distributed_optimizer and optimizer not in ("adam", "sgd"):
        why = ("Newton-Schulz / Kronecker factors need whole weight matrices and ZeRO-1 "
               "splits tensors at arbitrary element boundaries"
               if optimizer in MATRIX_WISE else
               "Megatron-core builds registry optimizers only inside FP32Optimizer or "
               "LayerWiseDistributedOptimizer")
        raise OptimizerChoiceError(
            f"--optimizer {optimizer} cannot run inside Megatron's flat DistributedOptimizer "
            f"(--use-distributed-optimizer): {why}. Use "
            f"--use-layer-wise-distributed-optimizer to shard it over data-parallel ranks "
            f"(whole tensors per rank), or drop the flag to replicate it.")
    if use_layer_wise and optimizer == "sgd":
        raise OptimizerChoiceError(
            "--use-layer-wise-distributed-optimizer shards registry optimizers (nadamw, "
            "muon, soap, adam through them); for --optimizer sgd use "
            "--use-distributed-optimizer.")



@dataclass
class OptimConfig:
    optimizer: str = option(
        "adam", "adam / sgd: Megatron's own; nadamw: asynchronous Nesterov (NAdam, decoupled "
        "WD); muon: emerging-optimizers' Muon (AdamW for non-matrices); soap: SOAP with a "
        "stage-aware basis refresh", "optim", OPTIMIZERS)
    use_layer_wise_distributed_optimizer: bool = option(
        False, "shard optimizer state over DP by whole tensors (Megatron's "
        "LayerWiseDistributedOptimizer; the way to shard muon / soap / nadamw)", "optim")
    nadamw_beta1: float = option(0.99, "nadamw beta1 (the paper's 0.99)", "optim")
    nadamw_beta2: float = option(0.999, "nadamw beta2", "optim")
    nadamw_momentum_decay: float = option(0.004, "NAdam momentum decay (psi)", "optim")
    nadamw_stage_aware: bool = option(
        False, "the paper's no-stash rule: beta1 0.99 at the first stage down to 0.9 at the "
        "last, lr from 0.5x at the first stage up to 1x at the last", "optim")
    muon_momentum: float = option(0.95, "Muon momentum", "optim")
    muon_nesterov: bool = option(True, "Nesterov form of Muon's momentum", "optim")
    muon_extra_scale_factor: float = option(
        0.2, "Muon update scale on top of the spectral sqrt(max(m, n)): 0.2 matches AdamW's "
        "update RMS (Moonlight), so one --lr serves Muon and its AdamW part", "optim")
    muon_split_qkv: bool = option(
        True, "orthogonalize Q, K and V blocks of the fused QKV weight separately "
        "(Megatron's default)", "optim")
    muon_fp32_matmul_prec: str = option(
        "auto", "precision of Muon's Newton-Schulz matmuls (Megatron's muon_fp32_matmul_prec):"
        " medium = bf16 (tensor cores), highest = fp32. auto: medium on CUDA, highest on CPU, "
        "where bf16 GEMMs are emulated (about 30x slower on a 3072 x 768 matrix here)",
        "optim", ("auto", "highest", "high", "medium"))
    soap_precondition_frequency: int = option(
        10, "SOAP eigenbasis refresh period (steps) of a delay-free stage", "optim")
    soap_stage_aware: bool = option(
        True, "refresh the basis every ceil(f / (1 + stage delay)) steps: staler stages "
        "more often", "optim")
    soap_shampoo_beta: float = option(0.95, "SOAP Kronecker-factor EMA", "optim")
    delay_error_feedback: float = option(
        0.0, "error feedback for delayed updates: W += u_t + alpha (u_t - u_(t-1)), alpha "
        "scaled by the stage's delay (0 = off)", "optim")
    pipemare_anneal_iters: int = option(
        0, "PipeMare lr correction lr / tau^(1 - t/T) over T steps, tau = 1 + stage delay "
        "(0 = off)", "optim")
    lr: float = option(1e-3, "peak learning rate", "optim")
    min_lr: float = option(1e-4, "final learning rate of the decay", "optim")
    decoupled_lr: Optional[float] = option(
        None, "peak learning rate of the input embedding and the output layer (Megatron's "
        "--decoupled-lr: a param-group override; default --lr)", "optim")
    decoupled_min_lr: Optional[float] = option(
        None, "final learning rate of the embedding and output layer (Megatron's "
        "--decoupled-min-lr; default --min-lr scaled like --decoupled-lr)", "optim")
    lr_warmup_iters: int = option(20, "linear warm-up iterations", "optim")
    lr_decay_iters: Optional[int] = option(None, "decay length (default train_iters)", "optim")
    lr_decay_style: str = option("cosine", "decay shape", "optim",
                                 ("cosine", "linear", "constant"))
    weight_decay: float = option(0.1, "decoupled weight decay", "optim")
    adam_beta1: float = option(0.9, "Adam beta1", "optim")
    adam_beta2: float = option(0.95, "Adam beta2", "optim")
    adam_eps: float = option(1e-8, "Adam epsilon", "optim")
    sgd_momentum: float = option(0.0, "SGD momentum", "optim")
    clip_grad: float = option(1.0, "global gradient-norm clip (0 disables)", "optim")

    def resolved_muon_fp32_matmul_prec(self) -> str:
        if self.muon_fp32_matmul_prec != "auto":
            return self.muon_fp32_matmul_prec
        import torch

        return "medium" if torch.cuda.is_available() else "highest"

    def validate_optimizer(self, use_distributed_optimizer: bool) -> None:
        """``use_distributed_optimizer``: the data-parallel layout's ZeRO-1 flag, which
        decides which optimizers can run."""
        check_choices(self, OptimConfig)
        try:
            check_choice(self.optimizer, use_distributed_optimizer,
                         self.use_layer_wise_distributed_optimizer)
        except OptimizerChoiceError as exc:
            raise ConfigError(str(exc)) from None
        if not 0.0 <= self.delay_error_feedback <= 1.0:
            raise ConfigError(
                f"--delay-error-feedback must be in [0, 1] (0 = off, 1 = full extrapolation),"
                f" got {self.delay_error_feedback}.")
        if self.pipemare_anneal_iters < 0:
            raise ConfigError(
                f"--pipemare-anneal-iters must be >= 0 (0 = off), got "
                f"{self.pipemare_anneal_iters}.")
        if self.soap_precondition_frequency < 1:
            raise ConfigError(
                f"--soap-precondition-frequency must be >= 1, got "
                f"{self.soap_precondition_frequency}.")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ConfigError(
                f"need 0 <= --min-lr <= --lr and --lr > 0, got lr={self.lr}, "
                f"min_lr={self.min_lr}.")
        edge_min = self.resolved_decoupled_min_lr()
        if self.decoupled_lr is not None and (
                self.decoupled_lr <= 0 or not 0 <= edge_min <= self.decoupled_lr):
            raise ConfigError(
                f"need 0 <= --decoupled-min-lr <= --decoupled-lr and --decoupled-lr > 0, got "
                f"decoupled_lr={self.decoupled_lr}, decoupled_min_lr={self.decoupled_min_lr}; "
                f"leave both out to train the embedding and output layer at --lr.")
        if self.decoupled_min_lr is not None and self.decoupled_lr is None:
            raise ConfigError(
                f"--decoupled-min-lr {self.decoupled_min_lr} needs --decoupled-lr (the peak "
                f"of the embedding and output layer's schedule).")
        if self.lr_warmup_iters < 0:
            raise ConfigError(f"--lr-warmup-iters must be >= 0, got {self.lr_warmup_iters}.")

    def resolved_decoupled_min_lr(self) -> Optional[float]:
        """The embedding / output layer's final lr: given, or --min-lr in the same ratio to
        --lr as --decoupled-lr (so the two schedules keep one shape)."""
        if self.decoupled_lr is None:
            return None
        if self.decoupled_min_lr is not None:
            return self.decoupled_min_lr
        return self.min_lr * self.decoupled_lr / self.lr

    def check_warmup(self, train_iters: int) -> None:
        decay = self.lr_decay_iters or train_iters
        if self.lr_warmup_iters >= decay:
            raise ConfigError(
                f"--lr-warmup-iters {self.lr_warmup_iters} must be smaller than the decay "
                f"length {decay} (--lr-decay-iters, default --train-iters); lower the warm-up "
                f"(e.g. {max(0, decay // 10)}) or train longer.")
