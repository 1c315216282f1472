"""Training configuration: the components' configs composed, Megatron-LM's flag names,
YAML files.

Each component declares and validates its own options where it lives:
``model.ModelConfig``, ``distributed.ParallelConfig``, ``pipeline.config.ScheduleConfig``,
``optim.config.OptimConfig``, ``dataparallel.config.DataParallelConfig``,
``data.config.DataConfig``, ``checkpoint.config.CheckpointConfig`` and
``runner.config.RunConfig``. :class:`TrainConfig` composes them; every field is a
command-line flag spelled the way Megatron-LM spells it (``num_layers`` ->
``--num-layers``) and a key of the YAML file given with ``--config``. Precedence:
built-in default < YAML < command line. Unknown YAML keys are an error, never silently
ignored.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, fields
from typing import Any, Dict, Optional, Sequence

import yaml

from megatron_asyncmesh.checkpoint.config import CheckpointConfig
from megatron_asyncmesh.data.config import DataConfig
from megatron_asyncmesh.dataparallel.config import DataParallelConfig, check_ranks_per_replica
from megatron_asyncmesh.distributed import ParallelConfig
from megatron_asyncmesh.model import ModelConfig
from megatron_asyncmesh.optim.config import OptimConfig
from megatron_asyncmesh.options import ConfigError, flag
from megatron_asyncmesh.pipeline.config import ScheduleConfig
from megatron_asyncmesh.pipeline.schedule import ScheduleError
from megatron_asyncmesh.pipeline.schedule import check as check_schedule
from megatron_asyncmesh.runner.config import RunConfig

__all__ = ["ConfigError", "TrainConfig", "config_from_dict", "load_yaml", "build_parser",
           "parse_config"]


@dataclass
class TrainConfig(RunConfig, CheckpointConfig, DataConfig, OptimConfig, DataParallelConfig,
                  ScheduleConfig, ParallelConfig, ModelConfig):
    """Every option of a run: the components' own configs, composed into one flat set of
    fields (the flags). Each component validates its options where it lives; the rules
    that tie two components together are checked here."""

    def validate(self) -> None:
        """Checks that need no process group. Raises ConfigError."""
        self.validate_model()
        self.validate_parallel()
        self.validate_schedule()
        self.validate_run()
        self.validate_data()
        self.validate_checkpoint()
        self.validate_optimizer(self.use_distributed_optimizer)
        self.validate_averaging(self.seed, self.train_iters)
        # --- rules between components -----------------------------------------------
        self.check_split(self.num_layers, self.pipeline_model_parallel_size)
        tp = self.tensor_model_parallel_size
        for name, value in (("num_attention_heads", self.num_attention_heads),
                            ("ffn_hidden_size", self.resolved_ffn_hidden_size())):
            if value % tp:
                raise ConfigError(
                    f"--tensor-model-parallel-size {tp} does not divide --{flag(name)} {value}: "
                    f"each tensor-parallel rank holds whole attention heads and an equal "
                    f"share of the MLP. Use a TP that divides both "
                    f"({self.num_attention_heads} heads, ffn {self.resolved_ffn_hidden_size()}).")
        if (self.pipeline_schedule != "flush" and self.pipeline_model_parallel_size > 1
                and not self.untie_embeddings_and_output_weights):
            raise ConfigError(
                f"--pipeline-schedule {self.pipeline_schedule} with "
                f"--pipeline-model-parallel-size {self.pipeline_model_parallel_size} needs "
                f"--untie-embeddings-and-output-weights: tied embeddings live on the first "
                f"and the last stage and would be all-reduced between them every step, which "
                f"makes the pipeline synchronous again.")
        if self.dp_averaging == "sparse":
            for name in ("use_distributed_optimizer", "use_layer_wise_distributed_optimizer"):
                if not getattr(self, name):
                    continue
                if self.dp_ranks_per_replica == 1:
                    raise ConfigError(
                        f"--dp-averaging sparse with --{flag(name)} needs replicas of several "
                        f"ranks (--dp-ranks-per-replica R > 1): it shards optimizer state "
                        f"over data-parallel ranks, and with one rank per replica those are "
                        f"the replicas sparse averaging keeps independent. Add "
                        f"--dp-ranks-per-replica 2 (or more), or drop --{flag(name)}.")
                if self.bf16:
                    raise ConfigError(
                        f"--dp-averaging sparse with --{flag(name)} and --bf16: the sharded "
                        f"optimizer keeps each fp32 main parameter on one rank of the "
                        f"replica only, and the averaging corrects whole main parameters on "
                        f"every rank. Train in fp32 with --{flag(name)}, or drop it under "
                        f"--bf16 (the replicated optimizer works with every precision).")
        self.check_warmup(self.train_iters)

    def validate_world(self, world_size: int) -> int:
        """Check the layout against the world; return the data-parallel size."""
        pp, tp = self.pipeline_model_parallel_size, self.tensor_model_parallel_size
        if world_size % (pp * tp):
            raise ConfigError(
                f"world size {world_size} is not divisible by --pipeline-model-parallel-size "
                f"{pp} x --tensor-model-parallel-size {tp} = {pp * tp}. Launch PP x TP x DP "
                f"processes (e.g. {pp * tp} or {2 * pp * tp}).")
        dp = world_size // (pp * tp)
        if self.data_parallel_size is not None and self.data_parallel_size != dp:
            want = pp * tp * self.data_parallel_size
            raise ConfigError(
                f"world size {world_size} != PP x TP x DP = {pp} x {tp} x "
                f"{self.data_parallel_size} = {want}. Launch {want} processes or change "
                f"--data-parallel-size / --pipeline-model-parallel-size / "
                f"--tensor-model-parallel-size.")
        if self.dp_averaging == "sparse":
            check_ranks_per_replica(self.dp_ranks_per_replica, dp, sparse=True)
        per_step = self.micro_batch_size * dp
        if self.global_batch_size % per_step:
            raise ConfigError(
                f"--global-batch-size {self.global_batch_size} is not divisible by "
                f"--micro-batch-size x DP = {self.micro_batch_size} x {dp} = {per_step}. "
                f"Use a multiple of {per_step}, e.g. "
                f"{max(per_step, self.global_batch_size // per_step * per_step)}.")
        if self.pipeline_schedule != "flush":
            try:
                check_schedule(self.pipeline_schedule, pp, self.num_microbatches(dp))
            except ScheduleError as exc:
                raise ConfigError(str(exc)) from None
        return dp

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def config_from_dict(values: dict) -> TrainConfig:
    """A TrainConfig from a saved ``to_dict()`` (checkpoints, exports); keys this version
    does not know are ignored, missing ones take their defaults."""
    known = {f.name for f in fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in values.items() if k in known})


def load_yaml(path: str) -> Dict[str, Any]:
    """Read a YAML config; keys may use dashes or underscores."""
    if not os.path.isfile(path):
        raise ConfigError(f"--config {path!r}: no such file.")
    with open(path) as f:
        try:
            raw = yaml.safe_load(f) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"--config {path!r} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"--config {path!r} must be a mapping of option: value, "
                          f"got {type(raw).__name__}.")
    known = {f.name for f in fields(TrainConfig)}
    values = {}
    unknown = []
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name not in known:
            unknown.append(str(key))
        values[name] = value
    if unknown:
        import difflib

        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key.replace("-", "_"), sorted(known), n=1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ConfigError(
            f"--config {path!r} has unknown keys: {', '.join(hints)}. Valid keys are the "
            f"training flags without the leading dashes; see `asyncmesh-train --help`.")
    return values


def _parse_bool(text: str) -> bool:
    lowered = str(text).lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="asyncmesh-train",
        description="Train a Megatron-core GPT with pipeline x data parallelism. "
                    "Flags follow Megatron-LM; every flag is also a key of --config FILE.yaml.",
        argument_default=argparse.SUPPRESS)
    parser.add_argument("--config", help="YAML file of flag values (flags given here win)")
    # The deepspeed launcher appends --local_rank=N (LOCAL_RANK is in the env too).
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    groups: Dict[str, argparse._ArgumentGroup] = {}
    for f in fields(TrainConfig):
        group_name = f.metadata["group"]
        group = groups.setdefault(group_name, parser.add_argument_group(group_name))
        name = "--" + flag(f.name)
        help_text = f"{f.metadata['help']} (default: {f.default})"
        base_type = f.type if not isinstance(f.type, str) else f.type
        if "bool" in str(base_type):
            group.add_argument(name, nargs="?", const=True, type=_parse_bool, help=help_text)
            if f.default is True:
                group.add_argument("--no-" + flag(f.name), dest=f.name, action="store_false",
                                   help=f"disable {name}")
            continue
        if "int" in str(base_type):
            kind = int
        elif "float" in str(base_type):
            kind = float
        else:
            kind = str
        group.add_argument(name, type=kind, choices=f.metadata.get("choices"), help=help_text)
    return parser


def parse_config(argv: Optional[Sequence[str]] = None) -> TrainConfig:
    """argv -> validated TrainConfig (YAML first, then the command line)."""
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    values: Dict[str, Any] = {}
    config_path = args.pop("config", None)
    args.pop("local_rank", None)
    if config_path:
        values.update(load_yaml(config_path))
    values.update(args)
    try:
        cfg = TrainConfig(**values)
    except TypeError as exc:  # wrong value types from YAML end up here
        raise ConfigError(f"bad configuration: {exc}") from exc
    _coerce_types(cfg)
    cfg.validate()
    return cfg


def _coerce_types(cfg: TrainConfig) -> None:
    """YAML gives ints where floats are meant (lr: 1) and strings for 1e-3."""
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if value is None:
            continue
        kind = str(f.type)
        try:
            if "bool" in kind:
                if not isinstance(value, bool):
                    value = _parse_bool(value)
            elif "float" in kind:
                value = float(value)
            elif "int" in kind:
                if isinstance(value, float) and not value.is_integer():
                    raise ValueError(value)
                value = int(value)
        except (TypeError, ValueError, argparse.ArgumentTypeError):
            raise ConfigError(f"{f.name}: expected {kind.replace('Optional', '')}, "
                              f"got {value!r}.") from None
        setattr(cfg, f.name, value)
