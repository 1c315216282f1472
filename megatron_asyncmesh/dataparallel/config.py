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
    dp_selector: str = option(
        "auto", "block: disjoint groups of contiguous --dp-block-size blocks cycled (each "
        "coordinate once per ceil(1/p) steps, sequential copies); partition: the same over "
        "single coordinates; bernoulli: random p per step; auto: block for a new run, the "
        "checkpoint's selector when resuming", "parallel",
        ("auto", "block", "partition", "bernoulli"))
    dp_block_size: int = option(1024, "coordinates per averaged block (--dp-selector block)",
                                "parallel")
    dp_lambda: float = option(1.0, "weight of the drift correction (lambda, in [0, 4]; 1 = "
                              "the paper's)", "parallel")
    dp_seed: Optional[int] = option(None, "selector seed shared by the replicas (default "
                                    "--seed)", "parallel")
    dp_ema_start: int = option(1000, "step from which the ema momentum is cosine-annealed "
                               "0.5 -> 0.99", "parallel")
    dp_ema_anneal_iters: int = option(0, "length of that annealing (0 = to the end of "
                                      "training)", "parallel")
    dp_dense_warmup_iters: int = option(
        0, "a synchronous warm start: for the first N steps every parameter is averaged "
        "over the replicas every step (p = 1, tau = 0, a blocking all-reduce), then the "
        "sparse averaging starts", "parallel")
    dp_outer_lr: float = option(
        1.0, "outer step on the average (beyond the paper, after DiLoCo): the consensus "
        "moves by this times the averaged update (1 = the plain average, > 1 lengthens it)",
        "parallel")
    dp_outer_momentum: float = option(
        0.0, "Nesterov momentum of that outer step (0 = none); the outer step keeps an "
        "fp32 anchor (+ momentum) per parameter", "parallel")
    dp_ranks_per_replica: int = option(
        1, "data-parallel ranks per replica (R): inside a replica Megatron's synchronous "
        "data parallelism (gradient all-reduce, --use-distributed-optimizer allowed), "
        "sparse averaging only across replicas; DP / R replicas", "parallel")
    dp_final_average: bool = option(
        True, "at the end of training replace every replica by the replicas' mean, so the "
        "last checkpoint and every export hold one model", "parallel")

    def validate_averaging(self, seed: int, train_iters: int) -> None:
        check_choices(self, DataParallelConfig)
        averaging_config(self, seed, train_iters)
        check_ranks_per_replica(self.dp_ranks_per_replica, None,
                                self.dp_averaging == "sparse")


def check_ranks_per_replica(ranks_per_replica: int, dp: Optional[int], sparse: bool) -> int:
    """``--dp-ranks-per-replica`` against the data-parallel size ``dp`` (None: not known
    yet); returns the number of replicas (1 when ``dp`` is None). ConfigError otherwise."""
    r = ranks_per_replica
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise ConfigError(f"--dp-ranks-per-replica must be an integer >= 1, got {r!r}.")
    if r > 1 and not sparse:
        raise ConfigError(
            f"--dp-ranks-per-replica {r} needs --dp-averaging sparse: without it every "
            f"data-parallel rank is already in one synchronous replica. Drop the flag or "
            f"add --dp-averaging sparse.")
    if dp is None:
        return 1
    if dp % r:
        divisors = [d for d in range(1, dp + 1) if dp % d == 0]
        raise ConfigError(
            f"--dp-ranks-per-replica {r} does not divide the data-parallel size {dp}: "
            f"replicas must have equal size. Use one of {divisors}, or launch {r} x (number "
            f"of replicas) data-parallel ranks per stage.")
    return dp // r


# What --dp-selector auto means for a run that does not resume. Checkpoints record the
# resolved name; those written before the block selector existed record "partition".
SELECTOR_FOR_NEW_RUNS = "block"


def resolve_selector(cfg: DataParallelConfig, saved: Optional[dict], where: str) -> None:
    """Settle ``--dp-selector auto`` (and check an explicit one) against the config a
    resumed checkpoint recorded (``saved``; None for a new run). The selector fixes which
    coordinates every pending average and the drift EMA hold, so a run continues with
    the selector it was saved with."""
    if cfg.dp_averaging != "sparse":
        return
    if saved is None or saved.get("dp_averaging") != "sparse":
        if cfg.dp_selector == "auto":
            cfg.dp_selector = SELECTOR_FOR_NEW_RUNS
        return
    mine = (cfg.dp_selector, cfg.dp_block_size)
    theirs = (saved.get("dp_selector", "partition"), saved.get("dp_block_size", 1024))
    if cfg.dp_selector == "auto":
        cfg.dp_selector, cfg.dp_block_size = theirs
    elif mine[0] != theirs[0] or (mine[0] == "block" and mine[1] != theirs[1]):
        raise ConfigError(
            f"{where} was saved with --dp-selector {theirs[0]}"
            + (f" --dp-block-size {theirs[1]}" if theirs[0] == "block" else "")
            + f", this run asks for --dp-selector {mine[0]}"
            + (f" --dp-block-size {mine[1]}" if mine[0] == "block" else "")
            + ": its pending averages and drift EMA hold that selector's coordinates. "
              f"Resume with --dp-selector auto (or {theirs[0]}).")


def averaging_config(cfg: DataParallelConfig, seed: int,
                     train_iters: int) -> Optional[AveragingConfig]:
    """The averager's AveragingConfig for ``--dp-averaging sparse`` (None for synchronous
    DP); ``seed`` (the run's) is the selector seed unless ``--dp-seed`` is given."""
    if cfg.dp_averaging != "sparse":
        return None
    try:
        return AveragingConfig(
            fraction=cfg.dp_fraction, delay=cfg.dp_delay, correction=cfg.dp_correction,
            selector=SELECTOR_FOR_NEW_RUNS if cfg.dp_selector == "auto" else cfg.dp_selector,
            block_size=cfg.dp_block_size, lam=cfg.dp_lambda,
            seed=seed if cfg.dp_seed is None else cfg.dp_seed,
            ema_start=cfg.dp_ema_start, ema_anneal_iters=cfg.dp_ema_anneal_iters,
            dense_iters=cfg.dp_dense_warmup_iters, outer_lr=cfg.dp_outer_lr,
            outer_momentum=cfg.dp_outer_momentum,
            train_iters=train_iters).validate()
    except AveragingError as exc:
        raise ConfigError(str(exc)) from None
