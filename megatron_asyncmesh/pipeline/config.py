"""The pipeline schedule's options: which schedule runs and how the layers are split."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron_asyncmesh.options import ConfigError, check_choices, divisors, option


@dataclass
class ScheduleConfig:
    pipeline_schedule: str = option(
        "flush", "flush = Megatron's synchronous 1F1B; 2bw = PipeDream-2BW (no flush, delay "
        "1); stash = PipeDream weight stashing (no flush, delay P-1-k)", "parallel",
        ("flush", "2bw", "stash"))
    decoder_first_pipeline_num_layers: Optional[int] = option(
        None, "layers on the first stage (uneven split, to balance the embedding)", "parallel")
    decoder_last_pipeline_num_layers: Optional[int] = option(
        None, "layers on the last stage (uneven split, to balance the output layer)",
        "parallel")

    def validate_schedule(self) -> None:
        check_choices(self, ScheduleConfig)
        for name, v in (("decoder-first-pipeline-num-layers",
                         self.decoder_first_pipeline_num_layers),
                        ("decoder-last-pipeline-num-layers",
                         self.decoder_last_pipeline_num_layers)):
            if v is not None and v < 1:
                raise ConfigError(f"--{name} {v}: needs a value >= 1.")

    def check_split(self, num_layers: int, pipeline_size: int) -> None:
        """``num_layers`` layers over ``pipeline_size`` stages, as the split flags ask."""
        P, L = pipeline_size, num_layers
        first, last = self.decoder_first_pipeline_num_layers, \
            self.decoder_last_pipeline_num_layers
        for name, v in (("decoder-first-pipeline-num-layers", first),
                        ("decoder-last-pipeline-num-layers", last)):
            if v is not None and P < 2:
                raise ConfigError(f"--{name} {v}: needs a value >= 1 and "
                                  f"--pipeline-model-parallel-size >= 2 (got {P}).")
        if first is None and last is None:
            if L % P:
                raise ConfigError(
                    f"--num-layers {L} is not divisible by --pipeline-model-parallel-size "
                    f"{P}: every stage must hold the same number of layers. Pick a pipeline "
                    f"size that divides {L} (e.g. {divisors(L)}), change --num-layers, or "
                    f"set --decoder-first/last-pipeline-num-layers for an uneven split.")
            return
        middle_stages = P - (first is not None) - (last is not None)
        rest = L - (first or 0) - (last or 0)
        if rest < 0 or (middle_stages == 0 and rest != 0) or (
                middle_stages > 0 and (rest <= 0 or rest % middle_stages)):
            raise ConfigError(
                f"uneven split: {L} layers with first={first}, last={last} leaves {rest} "
                f"layers for {middle_stages} other stage(s); they must divide evenly with at "
                f"least one layer each.")
