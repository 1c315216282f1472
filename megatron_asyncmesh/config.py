"""Training configuration: one dataclass, Megatron-LM's flag names, YAML files.

Every field of :class:`TrainConfig` is a command-line flag spelled the way
Megatron-LM spells it (``num_layers`` -> ``--num-layers``) and a key of the
YAML file given with ``--config``. Precedence: built-in default < YAML <
command line. Unknown YAML keys are an error, never silently ignored.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Optional, Sequence

import yaml


class ConfigError(ValueError):
    """A configuration value is wrong; the message says which and how to fix it."""


def _f(default: Any, help: str, group: str, choices: Optional[Sequence] = None):
    return field(default=default, metadata={"help": help, "group": group, "choices": choices})


@dataclass
class TrainConfig:
    # --- model -----------------------------------------------------------
    num_layers: int = _f(4, "transformer layers in the whole model", "model")
    hidden_size: int = _f(128, "model width", "model")
    num_attention_heads: int = _f(4, "attention heads", "model")
    ffn_hidden_size: Optional[int] = _f(None, "MLP width (default 4 x hidden)", "model")
    seq_length: int = _f(128, "tokens per sample", "model")
    max_position_embeddings: Optional[int] = _f(None, "default: seq_length", "model")
    position_embedding_type: str = _f(
        "learned_absolute", "GPT-2 style learned positions or Llama style rope", "model",
        ("learned_absolute", "rope"))
    normalization: str = _f("LayerNorm", "LayerNorm (GPT-2) or RMSNorm (Llama)", "model",
                            ("LayerNorm", "RMSNorm"))
    swiglu: bool = _f(False, "SwiGLU MLP (Llama style)", "model")
    untie_embeddings_and_output_weights: bool = _f(False, "separate output layer", "model")
    hidden_dropout: float = _f(0.0, "dropout after attention/MLP", "model")
    attention_dropout: float = _f(0.0, "dropout on attention probabilities", "model")
    init_method_std: float = _f(0.02, "std of the normal weight init", "model")
    make_vocab_size_divisible_by: int = _f(128, "pad the vocabulary to a multiple", "model")
    transformer_impl: str = _f(
        "auto", "layer spec: Megatron's local one, Transformer Engine's, or TE when importable "
        "on a GPU", "model", ("auto", "local", "transformer_engine"))
    bf16: bool = _f(False, "bf16 weights with fp32 main params (GPU)", "model")

    # --- parallelism -----------------------------------------------------
    pipeline_model_parallel_size: int = _f(1, "pipeline stages (PP)", "parallel")
    data_parallel_size: Optional[int] = _f(
        None, "data-parallel replicas (DP); default world_size / PP", "parallel")
    tensor_model_parallel_size: int = _f(1, "tensor parallel size (1 on CPU)", "parallel")
    use_distributed_optimizer: bool = _f(False, "shard optimizer state over DP (ZeRO-1)",
                                         "parallel")
    dp_averaging: str = _f(
        "none", "none = Megatron's synchronous gradient all-reduce over DP; sparse = AsyncMesh: "
        "no gradient all-reduce, replicas asynchronously average a rotating --dp-fraction of "
        "their parameters, applied --dp-delay steps later", "parallel", ("none", "sparse"))
    dp_fraction: float = _f(0.05, "share of every tensor averaged per step (p; 1 = dense "
                            "parameter averaging)", "parallel")
    dp_delay: int = _f(10, "steps between launching an average and applying it (tau; 0 = "
                       "SPARTA)", "parallel")
    dp_correction: str = _f(
        "ema", "avg: W[S] <- A (AsyncSPARTA); drift: A + lambda D; ema: A + lambda EMA(D) "
        "(AsyncMesh)", "parallel", ("avg", "drift", "ema"))
    dp_selector: str = _f("partition", "partition: disjoint groups cycled (each coordinate "
                          "once per ceil(1/p) steps); bernoulli: random p per step", "parallel",
                          ("partition", "bernoulli"))
    dp_lambda: float = _f(1.0, "weight of the drift correction (lambda)", "parallel")
    dp_seed: Optional[int] = _f(None, "selector seed shared by the replicas (default --seed)",
                                "parallel")
    dp_ema_start: int = _f(1000, "step from which the ema momentum is cosine-annealed "
                           "0.5 -> 0.99", "parallel")
    dp_ema_anneal_iters: int = _f(0, "length of that annealing (0 = to the end of training)",
                                  "parallel")
    pipeline_schedule: str = _f(
        "flush", "flush = Megatron's synchronous 1F1B; 2bw = PipeDream-2BW (no flush, delay 1);"
        " stash = PipeDream weight stashing (no flush, delay P-1-k)", "parallel",
        ("flush", "2bw", "stash"))
    decoder_first_pipeline_num_layers: Optional[int] = _f(
        None, "layers on the first stage (uneven split, to balance the embedding)", "parallel")
    decoder_last_pipeline_num_layers: Optional[int] = _f(
        None, "layers on the last stage (uneven split, to balance the output layer)", "parallel")

    # --- batch -----------------------------------------------------------
    micro_batch_size: int = _f(4, "samples per microbatch", "batch")
    global_batch_size: int = _f(16, "samples per optimizer step over all replicas", "batch")

    # --- optimizer and schedule -------------------------------------------
    optimizer: str = _f(
        "adam", "adam / sgd: Megatron's own; nadamw: asynchronous Nesterov (NAdam, decoupled "
        "WD); muon: emerging-optimizers' Muon (AdamW for non-matrices); soap: SOAP with a "
        "stage-aware basis refresh", "optim", ("adam", "sgd", "nadamw", "muon", "soap"))
    use_layer_wise_distributed_optimizer: bool = _f(
        False, "shard optimizer state over DP by whole tensors (Megatron's "
        "LayerWiseDistributedOptimizer; the way to shard muon / soap / nadamw)", "optim")
    nadamw_beta1: float = _f(0.99, "nadamw beta1 (the paper's 0.99)", "optim")
    nadamw_beta2: float = _f(0.999, "nadamw beta2", "optim")
    nadamw_momentum_decay: float = _f(0.004, "NAdam momentum decay (psi)", "optim")
    nadamw_stage_aware: bool = _f(
        False, "the paper's no-stash rule: beta1 0.99 at the first stage down to 0.9 at the "
        "last, lr from 0.5x at the first stage up to 1x at the last", "optim")
    muon_momentum: float = _f(0.95, "Muon momentum", "optim")
    muon_nesterov: bool = _f(True, "Nesterov form of Muon's momentum", "optim")
    muon_extra_scale_factor: float = _f(
        0.2, "Muon update scale on top of the spectral sqrt(max(m, n)): 0.2 matches AdamW's "
        "update RMS (Moonlight), so one --lr serves Muon and its AdamW part", "optim")
    muon_split_qkv: bool = _f(
        True, "orthogonalize Q, K and V blocks of the fused QKV weight separately "
        "(Megatron's default)", "optim")
    muon_fp32_matmul_prec: str = _f(
        "auto", "precision of Muon's Newton-Schulz matmuls (Megatron's muon_fp32_matmul_prec): "
        "medium = bf16 (tensor cores), highest = fp32. auto: medium on CUDA, highest on CPU, "
        "where bf16 GEMMs are emulated (about 30x slower on a 3072 x 768 matrix here)",
        "optim", ("auto", "highest", "high", "medium"))
    soap_precondition_frequency: int = _f(
        10, "SOAP eigenbasis refresh period (steps) of a delay-free stage", "optim")
    soap_stage_aware: bool = _f(
        True, "refresh the basis every ceil(f / (1 + stage delay)) steps: staler stages "
        "more often", "optim")
    soap_shampoo_beta: float = _f(0.95, "SOAP Kronecker-factor EMA", "optim")
    delay_error_feedback: float = _f(
        0.0, "error feedback for delayed updates: W += u_t + alpha (u_t - u_(t-1)), alpha "
        "scaled by the stage's delay (0 = off)", "optim")
    pipemare_anneal_iters: int = _f(
        0, "PipeMare lr correction lr / tau^(1 - t/T) over T steps, tau = 1 + stage delay "
        "(0 = off)", "optim")
    lr: float = _f(1e-3, "peak learning rate", "optim")
    min_lr: float = _f(1e-4, "final learning rate of the decay", "optim")
    lr_warmup_iters: int = _f(20, "linear warm-up iterations", "optim")
    lr_decay_iters: Optional[int] = _f(None, "decay length (default train_iters)", "optim")
    lr_decay_style: str = _f("cosine", "decay shape", "optim", ("cosine", "linear", "constant"))
    weight_decay: float = _f(0.1, "decoupled weight decay", "optim")
    adam_beta1: float = _f(0.9, "Adam beta1", "optim")
    adam_beta2: float = _f(0.95, "Adam beta2", "optim")
    adam_eps: float = _f(1e-8, "Adam epsilon", "optim")
    sgd_momentum: float = _f(0.0, "SGD momentum", "optim")
    clip_grad: float = _f(1.0, "global gradient-norm clip (0 disables)", "optim")

    # --- training loop ----------------------------------------------------
    train_iters: int = _f(100, "optimizer steps", "train")
    eval_interval: int = _f(50, "evaluate every N steps (and at the end)", "train")
    eval_iters: int = _f(4, "validation batches per evaluation (a fixed set)", "train")
    log_interval: int = _f(1, "steps between metric lines", "train")
    seed: int = _f(1234, "random seed", "train")

    # --- data ------------------------------------------------------------
    data_path: Optional[str] = _f(
        None, "prefix of a preprocessed .bin/.idx pair (default: the bundled corpus)", "data")
    tokenizer_model: Optional[str] = _f(
        None, "sentencepiece model (default: the one next to --data-path)", "data")
    split: str = _f("98,2,0", "train,valid,test weights over documents", "data")
    data_cache_path: Optional[str] = _f(None, "where Megatron caches sample indices", "data")

    # --- checkpoints and outputs -------------------------------------------
    save: Optional[str] = _f(None, "checkpoint directory to write", "ckpt")
    load: Optional[str] = _f(None, "checkpoint directory to resume from", "ckpt")
    save_interval: Optional[int] = _f(None, "save every N steps (and at the end)", "ckpt")
    save_keep_last: int = _f(0, "keep only the newest K complete checkpoints (0 = all)", "ckpt")
    run_dir: str = _f("runs/latest", "where metrics.jsonl, summary.json, tensorboard go",
                      "output")
    num_threads: Optional[int] = _f(
        None, "torch intra-op threads per rank (default: cores / local ranks)", "output")
    progress: bool = _f(True, "progress bar on rank 0", "output")

    # ------------------------------------------------------------------
    def resolved_ffn_hidden_size(self) -> int:
        return self.ffn_hidden_size or 4 * self.hidden_size

    def resolved_muon_fp32_matmul_prec(self) -> str:
        if self.muon_fp32_matmul_prec != "auto":
            return self.muon_fp32_matmul_prec
        import torch

        return "medium" if torch.cuda.is_available() else "highest"

    def resolved_max_position_embeddings(self) -> int:
        return self.max_position_embeddings or self.seq_length

    def validate(self) -> None:
        """Checks that need no process group. Raises ConfigError."""
        positive = ("num_layers", "hidden_size", "num_attention_heads", "seq_length",
                    "micro_batch_size", "global_batch_size", "train_iters",
                    "pipeline_model_parallel_size", "tensor_model_parallel_size",
                    "eval_interval", "log_interval")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"--{_flag(name)} must be a positive integer, got {value!r}.")
        if self.eval_iters < 0:
            raise ConfigError(f"--eval-iters must be >= 0, got {self.eval_iters}.")
        for name in fields(self):
            choices = name.metadata.get("choices")
            if choices and getattr(self, name.name) not in choices:
                raise ConfigError(
                    f"--{_flag(name.name)} must be one of {list(choices)}, "
                    f"got {getattr(self, name.name)!r}.")
        self._validate_split()
        if (self.pipeline_schedule != "flush" and self.pipeline_model_parallel_size > 1
                and not self.untie_embeddings_and_output_weights):
            raise ConfigError(
                f"--pipeline-schedule {self.pipeline_schedule} with "
                f"--pipeline-model-parallel-size {self.pipeline_model_parallel_size} needs "
                f"--untie-embeddings-and-output-weights: tied embeddings live on the first "
                f"and the last stage and would be all-reduced between them every step, which "
                f"makes the pipeline synchronous again.")
        from megatron_asyncmesh.optim import OptimizerChoiceError, check_choice
        try:
            check_choice(self.optimizer, self.use_distributed_optimizer,
                         self.use_layer_wise_distributed_optimizer)
        except OptimizerChoiceError as exc:
            raise ConfigError(str(exc)) from None
        if self.dp_averaging == "sparse":
            from megatron_asyncmesh.dataparallel.megatron import averaging_config

            averaging_config(self)
            for flag in ("use_distributed_optimizer", "use_layer_wise_distributed_optimizer"):
                if getattr(self, flag):
                    raise ConfigError(
                        f"--dp-averaging sparse cannot be combined with --{_flag(flag)}: "
                        f"that shards optimizer state over the data-parallel replicas, which "
                        f"sparse averaging keeps independent (each replica needs its whole "
                        f"optimizer state). Drop --{_flag(flag)}, or use --dp-averaging none.")
        if not 0.0 <= self.delay_error_feedback <= 1.0:
            raise ConfigError(
                f"--delay-error-feedback must be in [0, 1] (0 = off, 1 = full extrapolation), "
                f"got {self.delay_error_feedback}.")
        if self.pipemare_anneal_iters < 0:
            raise ConfigError(
                f"--pipemare-anneal-iters must be >= 0 (0 = off), got "
                f"{self.pipemare_anneal_iters}.")
        if self.soap_precondition_frequency < 1:
            raise ConfigError(
                f"--soap-precondition-frequency must be >= 1, got "
                f"{self.soap_precondition_frequency}.")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"--hidden-size {self.hidden_size} is not divisible by --num-attention-heads "
                f"{self.num_attention_heads}.")
        if self.tensor_model_parallel_size != 1:
            raise ConfigError(
                f"--tensor-model-parallel-size {self.tensor_model_parallel_size} is not "
                f"supported: this project parallelises over pipeline and data axes; use 1.")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ConfigError(
                f"need 0 <= --min-lr <= --lr and --lr > 0, got lr={self.lr}, "
                f"min_lr={self.min_lr}.")
        if self.lr_warmup_iters < 0:
            raise ConfigError(f"--lr-warmup-iters must be >= 0, got {self.lr_warmup_iters}.")
        decay = self.lr_decay_iters or self.train_iters
        if self.lr_warmup_iters >= decay:
            raise ConfigError(
                f"--lr-warmup-iters {self.lr_warmup_iters} must be smaller than the decay "
                f"length {decay} (--lr-decay-iters, default --train-iters); lower the warm-up "
                f"(e.g. {max(0, decay // 10)}) or train longer.")
        if self.save_keep_last < 0:
            raise ConfigError(f"--save-keep-last must be >= 0 (0 keeps all), got "
                              f"{self.save_keep_last}.")
        if self.save_interval is not None and self.save_interval < 1:
            raise ConfigError(f"--save-interval must be >= 1, got {self.save_interval}.")

    def _validate_split(self) -> None:
        P, L = self.pipeline_model_parallel_size, self.num_layers
        first, last = self.decoder_first_pipeline_num_layers, self.decoder_last_pipeline_num_layers
        for name, v in (("decoder-first-pipeline-num-layers", first),
                        ("decoder-last-pipeline-num-layers", last)):
            if v is not None and (v < 1 or P < 2):
                raise ConfigError(f"--{name} {v}: needs a value >= 1 and "
                                  f"--pipeline-model-parallel-size >= 2 (got {P}).")
        if first is None and last is None:
            if L % P:
                raise ConfigError(
                    f"--num-layers {L} is not divisible by --pipeline-model-parallel-size {P}: "
                    f"every stage must hold the same number of layers. Pick a pipeline size "
                    f"that divides {L} (e.g. {_divisors(L)}), change --num-layers, or set "
                    f"--decoder-first/last-pipeline-num-layers for an uneven split.")
            return
        middle_stages = P - (first is not None) - (last is not None)
        rest = L - (first or 0) - (last or 0)
        if rest < 0 or (middle_stages == 0 and rest != 0) or (
                middle_stages > 0 and (rest <= 0 or rest % middle_stages)):
            raise ConfigError(
                f"uneven split: {L} layers with first={first}, last={last} leaves {rest} "
                f"layers for {middle_stages} other stage(s); they must divide evenly with at "
                f"least one layer each.")

    def validate_world(self, world_size: int) -> int:
        """Check the layout against the world; return the data-parallel size."""
        pp = self.pipeline_model_parallel_size
        if world_size % pp:
            raise ConfigError(
                f"world size {world_size} is not divisible by --pipeline-model-parallel-size "
                f"{pp}. Launch PP x DP processes (e.g. {pp} or {2 * pp}).")
        dp = world_size // pp
        if self.data_parallel_size is not None and self.data_parallel_size != dp:
            raise ConfigError(
                f"world size {world_size} != PP x DP = {pp} x {self.data_parallel_size} = "
                f"{pp * self.data_parallel_size}. Launch {pp * self.data_parallel_size} "
                f"processes or change --data-parallel-size / --pipeline-model-parallel-size.")
        per_step = self.micro_batch_size * dp
        if self.global_batch_size % per_step:
            raise ConfigError(
                f"--global-batch-size {self.global_batch_size} is not divisible by "
                f"--micro-batch-size x DP = {self.micro_batch_size} x {dp} = {per_step}. "
                f"Use a multiple of {per_step}, e.g. "
                f"{max(per_step, self.global_batch_size // per_step * per_step)}.")
        if self.pipeline_schedule != "flush":
            from megatron_asyncmesh.pipeline.schedule import ScheduleError, check

            try:
                check(self.pipeline_schedule, pp, self.num_microbatches(dp))
            except ScheduleError as exc:
                raise ConfigError(str(exc)) from None
        return dp

    def num_microbatches(self, dp: int) -> int:
        return self.global_batch_size // (self.micro_batch_size * dp)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _divisors(n: int) -> List[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


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
        flag = "--" + _flag(f.name)
        help_text = f"{f.metadata['help']} (default: {f.default})"
        base_type = f.type if not isinstance(f.type, str) else f.type
        if "bool" in str(base_type):
            group.add_argument(flag, nargs="?", const=True, type=_parse_bool, help=help_text)
            if f.default is True:
                group.add_argument("--no-" + _flag(f.name), dest=f.name, action="store_false",
                                   help=f"disable {flag}")
            continue
        if "int" in str(base_type):
            kind = int
        elif "float" in str(base_type):
            kind = float
        else:
            kind = str
        group.add_argument(flag, type=kind, choices=f.metadata.get("choices"), help=help_text)
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
