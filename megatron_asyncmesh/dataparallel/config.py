"""The data axis's options: Megatron's synchronous gradient all-reduce, or AsyncMesh's
asynchronous sparse parameter averaging and its parameters."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron_asyncmesh.dataparallel.averaging import AveragingConfig, AveragingError
from megatron_asyncmesh.options import ConfigError, check_choices, option


@dataclass
class DataParallelConfig:
    dp_averaging: str = option(
        "none", "none = Megatron's synchronous gradient all-reduce over DP; sparse = "
        "AsyncMesh: no gradient all-reduce, replicas asynchronously average a rotating "
        "--dp-fraction of their parameters, applied --dp-delay steps later", "parallel",
        ("none", "sparse"))
    dp_fraction: float = option(0.05, "share of every tensor averaged per step (p; 1 = dense "
                                "parameter averaging)", "parallel")
    dp_delay: int = option(10, "steps between launching an average and applying it (tau; "
                           "0 = SPARTA)", "parallel")
    dp_correction: str = option(
        "ema", "avg: W[S] <- A (AsyncSPARTA); drift: A + lambda D; ema: A + lambda EMA(D) "
        "(AsyncMesh)", "parallel", ("avg", "drift", "ema"))
    dp_selector: str = option("partition", "partition: disjoint groups cycled (each "
                              "coordinate once per ceil(1/p) steps); bernoulli: random p per "
                              "step", "parallel", ("partition", "bernoulli"))
    dp_lambda: float = option(1.0, "weight of the drift correction (lambda)", "parallel")
    dp_seed: Optional[int] = option(None, "selector seed shared by the replicas (default "
                                    "--seed)", "parallel")
    dp_ema_start: int = option(1000, "step from which the ema momentum is cosine-annealed "
                               "0.5 -> 0.99", "parallel")
    dp_ema_anneal_iters: int = option(0, "length of that annealing (0 = to the end of "
                                      "training)", "parallel")
    dp_final_average: bool = option(
        True, "at the end of training replace every replica by the replicas' mean, so the "
        "last checkpoint and every export hold one model", "parallel")

    def validate_averaging(self, seed: int, train_iters: int) -> None:
        check_choices(self, DataParallelConfig)
        averaging_config(self, seed, train_iters)


def averaging_config(cfg: DataParallelConfig, seed: int,
                     train_iters: int) -> Optional[AveragingConfig]:
    """The averager's AveragingConfig for ``--dp-averaging sparse`` (None for synchronous
    DP); ``seed`` (the run's) is the selector seed unless ``--dp-seed`` is given."""
    if cfg.dp_averaging != "sparse":
        return None
    try:
        return AveragingConfig(
            fraction=cfg.dp_fraction, delay=cfg.dp_delay, correction=cfg.dp_correction,
            selector=cfg.dp_selector, lam=cfg.dp_lambda,
            seed=seed if cfg.dp_seed is None else cfg.dp_seed,
            ema_start=cfg.dp_ema_start, ema_anneal_iters=cfg.dp_ema_anneal_iters,
            train_iters=train_iters).validate()
    except AveragingError as exc:
        raise ConfigError(str(exc)) from None
