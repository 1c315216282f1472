"""Megatron-core GPT stages.

The model is Megatron-core's ``GPTModel``; Megatron itself splits the layers
over pipeline stages (``TransformerBlock`` builds ``num_layers / PP`` layers
on each stage, the embedding on the first, the output layer and loss on the
last). The layer spec is Megatron's local one on CPU and Transformer
Engine's on a GPU where TE is importable (``--transformer-impl`` overrides).
"""

from __future__ import annotations

import importlib.util
import math

import torch

from megatron_asyncmesh.config import ConfigError, TrainConfig


def padded_vocab_size(vocab_size: int, divisible_by: int) -> int:
    """Megatron-LM's padding of the embedding table (TP = 1)."""
    return int(math.ceil(vocab_size / divisible_by) * divisible_by)


def transformer_engine_available() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("transformer_engine") is not None


def resolve_transformer_impl(cfg: TrainConfig) -> str:
    if cfg.transformer_impl == "auto":
        return "transformer_engine" if transformer_engine_available() else "local"
    if cfg.transformer_impl == "transformer_engine" and not transformer_engine_available():
        raise ConfigError("--transformer-impl transformer_engine needs a GPU and the "
                          "transformer_engine package; use --transformer-impl local.")
    return cfg.transformer_impl


def transformer_config(cfg: TrainConfig):
    from megatron.core.transformer import TransformerConfig

    on_gpu = torch.cuda.is_available()
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
        tensor_model_parallel_size=1,
        pipeline_dtype=dtype,
        params_dtype=dtype,
        bf16=cfg.bf16,
        # Initialise on the CPU with one generator so every layout (PP = 1, 2, ...)
        # draws identical weights for the same seed.
        use_cpu_initialization=True,
        # Fused kernels exist only on the GPU.
        bias_activation_fusion=on_gpu and not cfg.swiglu,
        bias_dropout_fusion=on_gpu,
        masked_softmax_fusion=on_gpu,
        persist_layer_norm=on_gpu,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        deallocate_pipeline_outputs=True,
    )


def layer_spec(cfg: TrainConfig):
    from megatron.core.models.gpt import gpt_layer_specs

    if resolve_transformer_impl(cfg) == "transformer_engine":
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()
    return gpt_layer_specs.get_gpt_layer_local_spec(normalization=cfg.normalization)


def build_gpt_stage(cfg: TrainConfig, vocab_size: int):
    """This rank's pipeline stage of the GPT (call after parallel_state init)."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    config = transformer_config(cfg)
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(cfg),
        vocab_size=padded_vocab_size(vocab_size, cfg.make_vocab_size_divisible_by),
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


def wrap_ddp(cfg: TrainConfig, model):
    """Megatron's DistributedDataParallel: contiguous grad buffers, DP all-reduce (none
    with ``--dp-averaging sparse``)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=cfg.use_distributed_optimizer,
        check_for_nan_in_grad=False,
    )
    pg_collection = None
    if cfg.dp_averaging == "sparse":
        # Independent replicas: DDP's data-parallel group is this rank alone, so its
        # gradient all-reduce is a no-op; the averaging runs after the optimizer step.
        from megatron_asyncmesh.dataparallel.megatron import replica_process_groups

        pg_collection = replica_process_groups()
    return DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model,
                                   pg_collection=pg_collection)


# Parameters Megatron initialises with the depth-scaled std sigma / sqrt(2 L).
_SCALED_INIT = ("linear_proj.weight", "linear_fc2.weight")
_TIED_OUTPUT = "output_layer.weight"
_WORD_EMBEDDING = "embedding.word_embeddings.weight"


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


def init_layout_independent(model, cfg: TrainConfig) -> None:
    """Redraw every random weight from a generator keyed on (seed, global name).

    Megatron draws weights from one RNG stream in construction order, so
    stage 1 of a PP = 2 model gets different numbers than the same layers of a
    PP = 1 model. Keying each draw on the parameter's global name makes the
    initial model identical for every pipeline layout (needed for parity
    between layouts and for lossless resharding). Distributions are
    Megatron's: N(0, init_method_std), depth-scaled for the output
    projections; constant-initialised tensors (norms, biases) are kept.
    """
    import hashlib

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
            value = torch.empty(param.shape, dtype=torch.float32).normal_(0.0, std, generator=gen)
            param.copy_(value.to(param.dtype))
