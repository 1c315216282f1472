"""Megatron-core GPT stages, and the model's configuration.

The model is Megatron-core's ``GPTModel``; Megatron itself splits the layers
over pipeline stages (``TransformerBlock`` builds ``num_layers / PP`` layers
on each stage, the embedding on the first, the output layer and loss on the
last). The layer spec is Megatron's local one on CPU and Transformer
Engine's on a GPU where TE is importable (``--transformer-impl`` overrides).

The functions here take the run's configuration (a ``TrainConfig``): the model's own
options (:class:`ModelConfig`) plus the pipeline split and the seed.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from typing import Optional

import torch

from megatron_asyncmesh.options import ConfigError, check_choices, check_positive, option


@dataclass
class ModelConfig:
    num_layers: int = option(4, "transformer layers in the whole model", "model")
    hidden_size: int = option(128, "model width", "model")
    num_attention_heads: int = option(4, "attention heads", "model")
    ffn_hidden_size: Optional[int] = option(None, "MLP width (default 4 x hidden)", "model")
    seq_length: int = option(128, "tokens per sample", "model")
    max_position_embeddings: Optional[int] = option(None, "default: seq_length", "model")
    position_embedding_type: str = option(
        "learned_absolute", "GPT-2 style learned positions or Llama style rope", "model",
        ("learned_absolute", "rope"))
    normalization: str = option("LayerNorm", "LayerNorm (GPT-2) or RMSNorm (Llama)", "model",
                                ("LayerNorm", "RMSNorm"))
    swiglu: bool = option(False, "SwiGLU MLP (Llama style)", "model")
    untie_embeddings_and_output_weights: bool = option(False, "separate output layer", "model")
    hidden_dropout: float = option(0.0, "dropout after attention/MLP", "model")
    attention_dropout: float = option(0.0, "dropout on attention probabilities", "model")
    init_method_std: float = option(0.02, "std of the normal weight init", "model")
    make_vocab_size_divisible_by: int = option(128, "pad the vocabulary to a multiple",
                                               "model")
    transformer_impl: str = option(
        "auto", "layer spec: Megatron's local one, Transformer Engine's, or TE when "
        "importable on a GPU", "model", ("auto", "local", "transformer_engine"))
    bf16: bool = option(False, "bf16 weights with fp32 main params (GPU)", "model")

    def resolved_ffn_hidden_size(self) -> int:
        return self.ffn_hidden_size or 4 * self.hidden_size

    def resolved_max_position_embeddings(self) -> int:
        return self.max_position_embeddings or self.seq_length

    def validate_model(self) -> None:
        check_positive(self, ("num_layers", "hidden_size", "num_attention_heads",
                              "seq_length"))
        check_choices(self, ModelConfig)
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"--hidden-size {self.hidden_size} is not divisible by --num-attention-heads "
                f"{self.num_attention_heads}.")


def padded_vocab_size(vocab_size: int, divisible_by: int) -> int:
    """Megatron-LM's padding of the embedding table (TP = 1)."""
    return int(math.ceil(vocab_size / divisible_by) * divisible_by)


def transformer_engine_available() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("transformer_engine") is not None


def resolve_transformer_impl(cfg) -> str:
    if cfg.transformer_impl == "auto":
        return "transformer_engine" if transformer_engine_available() else "local"
    if cfg.transformer_impl == "transformer_engine" and not transformer_engine_available():
        raise ConfigError("--transformer-impl transformer_engine needs a GPU and the "
                          "transformer_engine package; use --transformer-impl local.")
    return cfg.transformer_impl


def unwrap_model(model):
    """The GPTModel inside Megatron's wrappers (``DistributedDataParallel``,
    ``Float16Module``)."""
    while hasattr(model, "module"):
        model = model.module
    return model


def mixed_precision(model, cfg):
    """``--bf16`` the way Megatron-LM does it: the stage inside Megatron's
    ``Float16Module`` (every parameter, the norms included, and every activation in
    bf16; inputs cast on the first stage, the loss back to fp32 on the last). The
    optimizer keeps fp32 main parameters (``Float16OptimizerWithFloat16Params`` or the
    distributed optimizer). Unchanged without ``--bf16``."""
    if not cfg.bf16:
        return model
    from megatron.core.transformer.module import Float16Module

    return Float16Module(model.config, model)


# Megatron's optional compiled kernels, by the module that provides each.
_KERNEL_MODULES = {
    "apex_fast_layer_norm": "fast_layer_norm",                    # apex contrib
    "masked_softmax": "scaled_upper_triang_masked_softmax_cuda",  # Megatron's fused kernels
    "masked_softmax_padding": "scaled_masked_softmax_cuda",
    "transformer_engine": "transformer_engine",
}


def fused_kernels() -> dict:
    """Which optional fused kernels this process can import (none on a CPU)."""
    return {name: torch.cuda.is_available() and importlib.util.find_spec(mod) is not None
            for name, mod in _KERNEL_MODULES.items()}


def fusion_options(on_gpu: bool, kernels: dict, transformer_impl: str, swiglu: bool) -> dict:
    """Megatron's fusion flags, each on only where its kernel exists: the jit-scripted
    bias + GeLU / bias + dropout + add on any GPU; the persistent LayerNorm with apex's
    kernel (Megatron's local spec refuses it on torch's LayerNorm, which it uses without
    apex); the masked softmax with Megatron's compiled kernels or under Transformer
    Engine (which brings its own); gradient-accumulation fusion off (it needs apex's or
    TE's wgrad kernels writing into ``main_grad`` behind the weight-version swap)."""
    te = transformer_impl == "transformer_engine"
    return dict(
        bias_activation_fusion=on_gpu and not swiglu,
        bias_dropout_fusion=on_gpu,
        masked_softmax_fusion=on_gpu and (te or (kernels.get("masked_softmax", False)
                                                 and kernels.get("masked_softmax_padding",
                                                                 False))),
        persist_layer_norm=on_gpu and not te and kernels.get("apex_fast_layer_norm", False),
        gradient_accumulation_fusion=False,
    )


def transformer_config(cfg, on_gpu: Optional[bool] = None, kernels: Optional[dict] = None,
                       transformer_impl: Optional[str] = None):
    """Megatron's TransformerConfig for ``cfg``. ``on_gpu`` / ``kernels`` /
    ``transformer_impl`` default to this machine's; a test passes a CUDA machine's."""
    from megatron.core.transformer import TransformerConfig

    on_gpu = torch.cuda.is_available() if on_gpu is None else on_gpu
    kernels = fused_kernels() if kernels is None else kernels
    impl = transformer_impl or resolve_transformer_impl(cfg)
    dtype = torch.bfloat16 if cfg.bf16 else torch.float32
    return TransformerConfig(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        ffn_hidden_size=cfg.resolved_ffn_hidden_size(),
        hidden_dropout=cfg.hidden_dropout,
        attention_dropout=cfg.attention_dropout,
        init_method_std=cfg.init_method_std,
        normalization=cfg.normalization,
        gated_linear_unit=cfg.swiglu,
        activation_func=torch.nn.functional.silu if cfg.swiglu else torch.nn.functional.gelu,
        add_bias_linear=not cfg.swiglu,
        pipeline_model_parallel_size=cfg.pipeline_model_parallel_size,
        num_layers_in_first_pipeline_stage=cfg.decoder_first_pipeline_num_layers,
        num_layers_in_last_pipeline_stage=cfg.decoder_last_pipeline_num_layers,
        tensor_model_parallel_size=cfg.tensor_model_parallel_size,
        pipeline_dtype=dtype,
        params_dtype=dtype,
        bf16=cfg.bf16,
        # Initialise on the CPU with one generator so every layout (PP = 1, 2, ...)
        # draws identical weights for the same seed.
        use_cpu_initialization=True,
        **fusion_options(on_gpu, kernels, impl, cfg.swiglu),
        apply_rope_fusion=False,
        deallocate_pipeline_outputs=True,
        # Megatron's batched p2p calls torch.cuda.synchronize() after every call (for
        # old PyTorch); that waits for every stream, the sparse averager's all-reduce
        # included. Kept for Megatron's own schedule, off for the asynchronous ones.
        batch_p2p_sync=cfg.pipeline_schedule == "flush",
    )


def layer_spec(cfg):
    from megatron.core.models.gpt import gpt_layer_specs

    if resolve_transformer_impl(cfg) == "transformer_engine":
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()
    return gpt_layer_specs.get_gpt_layer_local_spec(normalization=cfg.normalization)


def build_gpt_stage(cfg, vocab_size: int):
    """This rank's pipeline stage of the GPT (call after parallel_state init)."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    config = transformer_config(cfg)
    padded = padded_vocab_size(vocab_size, cfg.make_vocab_size_divisible_by)
    if padded % cfg.tensor_model_parallel_size:
        raise ConfigError(
            f"the padded vocabulary ({padded} = {vocab_size} rounded up to "
            f"--make-vocab-size-divisible-by {cfg.make_vocab_size_divisible_by}) does not split "
            f"over --tensor-model-parallel-size {cfg.tensor_model_parallel_size}: use a "
            f"--make-vocab-size-divisible-by that is a multiple of the TP size.")
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(cfg),
        vocab_size=padded,
        max_sequence_length=cfg.resolved_max_position_embeddings(),
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=not cfg.untie_embeddings_and_output_weights,
        position_embedding_type=cfg.position_embedding_type,
    )
    # Megatron tags the word embedding and the output layer; the learned position
    # embedding is a lookup table too, so matrix-wise optimizers (Muon, SOAP) and the
    # layer-wise sharding route it with them (to AdamW), as Muon prescribes.
    position = getattr(getattr(model, "embedding", None), "position_embeddings", None)
    if position is not None:
        position.weight.is_embedding_or_output_parameter = True
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    return model


# Parameters Megatron initialises with the depth-scaled std sigma / sqrt(2 L).
_SCALED_INIT = ("linear_proj.weight", "linear_fc2.weight")
_TIED_OUTPUT = "output_layer.weight"
_WORD_EMBEDDING = "embedding.word_embeddings.weight"


def _full_shape(param, tp: int) -> tuple:
    """The shape of ``param`` in the TP = 1 model."""
    shape = list(param.shape)
    if tp > 1 and getattr(param, "tensor_model_parallel", False):
        shape[param.partition_dim] *= tp
    return tuple(shape)


def _tensor_shard(value: torch.Tensor, param, tp: int, rank: int, gated: bool) -> torch.Tensor:
    """This tensor-parallel rank's shard of the TP = 1 tensor ``value``, as Megatron's
    checkpoints lay it out: contiguous chunks along the partition dimension; a gated
    (SwiGLU) fc1 holds the same chunk of its gate half and of its up half."""
    if tp == 1 or not getattr(param, "tensor_model_parallel", False):
        return value
    dim = param.partition_dim
    if gated:
        return torch.cat([half.chunk(tp, dim=dim)[rank] for half in value.chunk(2, dim=dim)],
                         dim=dim)
    return value.chunk(tp, dim=dim)[rank]


def global_parameter_names(model) -> dict:
    """Stage-local parameter name -> name in the unsplit (PP = 1) model.

    Megatron numbers ``decoder.layers.<i>`` locally on each stage; the layer
    module knows its global ``layer_number`` (1-based).
    """
    offsets = {}
    decoder = getattr(model, "decoder", None)
    if decoder is not None:
        for local, layer in enumerate(decoder.layers):
            offsets[f"decoder.layers.{local}."] = f"decoder.layers.{layer.layer_number - 1}."
    names = {}
    for name, _ in model.named_parameters():
        global_name = name
        for local_prefix, global_prefix in offsets.items():
            if name.startswith(local_prefix):
                global_name = global_prefix + name[len(local_prefix):]
                break
        names[name] = global_name
    return names


def init_layout_independent(model, cfg) -> None:
    """Redraw every random weight from a generator keyed on (seed, global name).

    Megatron draws weights from one RNG stream in construction order, so
    stage 1 of a PP = 2 model gets different numbers than the same layers of a
    PP = 1 model. Keying each draw on the parameter's global name makes the
    initial model identical for every pipeline layout (needed for parity
    between layouts and for lossless resharding). Under tensor parallelism every
    rank draws the whole (TP = 1) tensor and keeps its shard, so a TP = 2 model holds
    exactly the TP = 1 model's weights. Distributions are
    Megatron's: N(0, init_method_std), depth-scaled for the output
    projections; constant-initialised tensors (norms, biases) are kept.
    """
    import hashlib

    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tied = not cfg.untie_embeddings_and_output_weights
    scaled_std = cfg.init_method_std / math.sqrt(2.0 * cfg.num_layers)
    with torch.no_grad():
        global_names = global_parameter_names(model)
        for name, param in model.named_parameters():
            global_name = global_names[name]
            if tied and global_name == _TIED_OUTPUT:
                global_name = _WORD_EMBEDDING  # the last stage's copy of the embedding
            if param.dim() < 2:
                if param.numel() > 1 and not bool((param == param.flatten()[0]).all()):
                    raise RuntimeError(f"{name}: expected a constant-initialised vector; the "
                                       f"layer spec changed, update init_layout_independent.")
                continue
            std = scaled_std if global_name.endswith(_SCALED_INIT) else cfg.init_method_std
            key = hashlib.sha256(f"{cfg.seed}:{global_name}".encode()).digest()
            gen = torch.Generator(device="cpu").manual_seed(int.from_bytes(key[:8], "little"))
            value = torch.empty(_full_shape(param, tp), dtype=torch.float32).normal_(
                0.0, std, generator=gen)
            value = _tensor_shard(value, param, tp, tp_rank,
                                  gated=cfg.swiglu and global_name.endswith("linear_fc1.weight"))
            param.copy_(value.to(param.dtype))
