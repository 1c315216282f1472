"""Checkpointing's options: where to save and load, how often, how many to keep."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron_asyncmesh.options import ConfigError, option


@dataclass
class CheckpointConfig:
    save: Optional[str] = option(None, "checkpoint directory to write", "ckpt")
    load: Optional[str] = option(None, "checkpoint directory to resume from", "ckpt")
    save_interval: Optional[int] = option(None, "save every N steps (and at the end)", "ckpt")
    save_keep_last: int = option(0, "keep only the newest K complete checkpoints (0 = all)",
                                 "ckpt")

    def validate_checkpoint(self) -> None:
        if self.save_keep_last < 0:
            raise ConfigError(f"--save-keep-last must be >= 0 (0 keeps all), got "
                              f"{self.save_keep_last}.")
        if self.save_interval is not None and self.save_interval < 1:
            raise ConfigError(f"--save-interval must be >= 1, got {self.save_interval}.")
