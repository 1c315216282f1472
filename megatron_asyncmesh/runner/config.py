"""The run's own options: batch sizes, the training loop's length and rhythm, outputs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron_asyncmesh.options import ConfigError, check_positive, option


@dataclass
class RunConfig:
    micro_batch_size: int = option(4, "samples per microbatch", "batch")
    global_batch_size: int = option(16, "samples per optimizer step over all replicas",
                                    "batch")
    train_iters: int = option(100, "optimizer steps", "train")
    eval_interval: int = option(50, "evaluate every N steps (and at the end)", "train")
    eval_iters: int = option(4, "validation batches per evaluation (a fixed set)", "train")
    log_interval: int = option(1, "steps between metric lines", "train")
    seed: int = option(1234, "random seed", "train")
    run_dir: str = option("runs/latest", "where metrics.jsonl, summary.json, tensorboard go",
                          "output")
    num_threads: Optional[int] = option(
        None, "torch intra-op threads per rank (default: cores / local ranks)", "output")
    progress: bool = option(True, "progress bar on rank 0", "output")

    def validate_run(self) -> None:
        check_positive(self, ("micro_batch_size", "global_batch_size", "train_iters",
                              "eval_interval", "log_interval"))
        if self.eval_iters < 0:
            raise ConfigError(f"--eval-iters must be >= 0, got {self.eval_iters}.")

    def num_microbatches(self, dp: int) -> int:
        return self.global_batch_size // (self.micro_batch_size * dp)
