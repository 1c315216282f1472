"""The data's options: the preprocessed corpus, its tokenizer and its split."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron_asyncmesh.options import ConfigError, option


@dataclass
class DataConfig:
    data_path: Optional[str] = option(
        None, "prefix of a preprocessed .bin/.idx pair (default: the bundled corpus)", "data")
    tokenizer_model: Optional[str] = option(
        None, "sentencepiece model (default: the one next to --data-path)", "data")
    split: str = option("98,2,0", "train,valid,test weights over documents", "data")
    data_cache_path: Optional[str] = option(None, "where Megatron caches sample indices",
                                            "data")

    def validate_data(self) -> None:
        """``--split``: up to three non-negative weights (Megatron's format), not all 0."""
        parts = str(self.split).replace("/", ",").split(",")
        try:
            weights = [float(p) for p in parts]
        except ValueError:
            weights = []
        if not 1 <= len(weights) <= 3 or min(weights) < 0 or sum(weights) <= 0:
            raise ConfigError(
                f"--split {self.split!r}: expected up to three non-negative weights for "
                f"train,valid,test separated by commas, not all zero (e.g. 98,2,0).")
