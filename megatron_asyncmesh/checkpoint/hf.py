"""Hugging Face ``transformers`` formats: Megatron-core GPT <-> GPT-2 / Llama.

The model family follows the project config: learned positions + LayerNorm +
GELU MLP with biases is GPT-2 (``GPT2LMHeadModel``); rotary positions +
RMSNorm + SwiGLU without biases is Llama (``LlamaForCausalLM``). Other
combinations have no standard Hugging Face class and are refused.

State dicts here are the unsplit (PP = 1) Megatron model's, fp32:
``embedding.word_embeddings.weight``, ``decoder.layers.<i>.self_attention.
linear_qkv.weight``, ... Megatron's fused QKV projection stores, per head,
[q; k; v] rows (``num_query_groups`` = heads here); Hugging Face stores all
queries, then all keys, then all values. GPT-2's ``Conv1D`` keeps weights as
[in, out], i.e. transposed. Every mapping is a permutation or a transpose, so
export and import are exact inverses (bitwise).
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch

from megatron_asyncmesh.options import ConfigError

PROJECT_CONFIG = "asyncmesh_config.json"   # written by the exporters beside config.json

# Megatron's Transformer Engine layer spec fuses each norm into the linear layer after it
# (TELayerNormColumnParallelLinear); the local spec keeps them as modules of their own.
_TE_NORMS = (("input_layernorm.", "self_attention.linear_qkv.layer_norm_"),
             ("pre_mlp_layernorm.", "mlp.linear_fc1.layer_norm_"))


def local_to_te_name(name: str) -> str:
    """A local-spec parameter name -> the Transformer Engine spec's name for it
    (``decoder.layers.3.input_layernorm.weight`` ->
    ``decoder.layers.3.self_attention.linear_qkv.layer_norm_weight``)."""
    for local, te in _TE_NORMS:
        i = name.find(local)
        if i >= 0 and name.count(".", i + len(local)) == 0:
            return name[:i] + te + name[i + len(local):]
    return name


def te_to_local_name(name: str) -> str:
    """The inverse of :func:`local_to_te_name`."""
    for local, te in _TE_NORMS:
        i = name.find(te)
        if i >= 0:
            return name[:i] + local + name[i + len(te):]
    return name

LAYERNORM_EPS = 1e-5        # Megatron TransformerConfig.layernorm_epsilon default
ROTARY_BASE = 10000.0       # Megatron GPTModel rotary_base default

Tensors = Dict[str, torch.Tensor]


def family(cfg) -> str:
    """'gpt2' or 'llama' for a project model config; ConfigError otherwise."""
    shape = (cfg.position_embedding_type, cfg.normalization, cfg.swiglu)
    if shape == ("learned_absolute", "LayerNorm", False):
        return "gpt2"
    if shape == ("rope", "RMSNorm", True):
        return "llama"
    raise ConfigError(
        f"no standard Hugging Face model has --position-embedding-type "
        f"{cfg.position_embedding_type} with --normalization {cfg.normalization} and "
        f"swiglu={cfg.swiglu}: export supports GPT-2 style (learned_absolute, LayerNorm, "
        f"GELU) and Llama style (rope, RMSNorm, --swiglu) models.")


def _split_qkv(w: torch.Tensor, heads: int) -> Tuple[torch.Tensor, ...]:
    """Megatron's per-head [q; k; v] rows -> (Q, K, V), each heads x head_dim rows."""
    hd = w.shape[0] // (3 * heads)
    per_head = w.reshape(heads, 3, hd, *w.shape[1:])
    return tuple(per_head[:, j].reshape(heads * hd, *w.shape[1:]) for j in range(3))


def _merge_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    hd = q.shape[0] // heads
    parts = [t.reshape(heads, 1, hd, *t.shape[1:]) for t in (q, k, v)]
    return torch.cat(parts, dim=1).reshape(3 * heads * hd, *q.shape[1:])


def hf_config(cfg, vocab_size: int, kind: str) -> dict:
    """config.json contents (``vocab_size``: the padded embedding rows)."""
    tied = not cfg.untie_embeddings_and_output_weights
    common = {"vocab_size": vocab_size, "bos_token_id": 1, "eos_token_id": 2,
              "pad_token_id": 3, "tie_word_embeddings": tied, "torch_dtype": "float32"}
    if kind == "gpt2":
        return {**common, "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
                "n_embd": cfg.hidden_size, "n_layer": cfg.num_layers,
                "n_head": cfg.num_attention_heads, "n_inner": cfg.resolved_ffn_hidden_size(),
                "n_positions": cfg.resolved_max_position_embeddings(),
                "activation_function": "gelu",       # Megatron's exact (erf) GELU
                "layer_norm_epsilon": LAYERNORM_EPS, "resid_pdrop": cfg.hidden_dropout,
                "embd_pdrop": cfg.hidden_dropout, "attn_pdrop": cfg.attention_dropout,
                "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
                "reorder_and_upcast_attn": False}
    return {**common, "model_type": "llama", "architectures": ["LlamaForCausalLM"],
            "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers,
            "num_attention_heads": cfg.num_attention_heads,
            "num_key_value_heads": cfg.num_attention_heads,
            "intermediate_size": cfg.resolved_ffn_hidden_size(),
            "max_position_embeddings": cfg.resolved_max_position_embeddings(),
            "rms_norm_eps": LAYERNORM_EPS, "hidden_act": "silu",
            "rope_theta": ROTARY_BASE,
            "rope_parameters": {"rope_type": "default", "rope_theta": ROTARY_BASE},
            "attention_bias": False, "mlp_bias": False,
            "attention_dropout": cfg.attention_dropout}


def config_overrides(hf: dict) -> dict:
    """Project model flags for a Hugging Face config.json (GPT-2 or Llama)."""
    kind = hf.get("model_type")
    if kind == "gpt2":
        if hf.get("activation_function") not in ("gelu", "gelu_new", "gelu_pytorch_tanh"):
            raise ConfigError(f"GPT-2 activation {hf.get('activation_function')!r}: only "
                              f"GELU maps to Megatron's MLP.")
        if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("reorder_and_upcast_attn"):
            raise ConfigError("GPT-2 attention variants (scale_attn_by_inverse_layer_idx, "
                              "reorder_and_upcast_attn) have no Megatron equivalent.")
        n_inner = hf.get("n_inner") or 4 * hf["n_embd"]
        return {"num_layers": hf["n_layer"], "hidden_size": hf["n_embd"],
                "num_attention_heads": hf["n_head"], "ffn_hidden_size": n_inner,
                "max_position_embeddings": hf["n_positions"],
                "position_embedding_type": "learned_absolute", "normalization": "LayerNorm",
                "swiglu": False,
                "untie_embeddings_and_output_weights": not hf.get("tie_word_embeddings", True)}
    if kind == "llama":
        heads = hf["num_attention_heads"]
        if hf.get("num_key_value_heads", heads) != heads:
            raise ConfigError("grouped-query attention (num_key_value_heads < "
                              "num_attention_heads) is not supported by this project's model.")
        if hf.get("attention_bias") or hf.get("mlp_bias"):
            raise ConfigError("Llama with attention_bias / mlp_bias: Megatron's SwiGLU "
                              "model has no biases.")
        return {"num_layers": hf["num_hidden_layers"], "hidden_size": hf["hidden_size"],
                "num_attention_heads": heads, "ffn_hidden_size": hf["intermediate_size"],
                "max_position_embeddings": hf["max_position_embeddings"],
                "position_embedding_type": "rope", "normalization": "RMSNorm", "swiglu": True,
                "untie_embeddings_and_output_weights": not hf.get("tie_word_embeddings", False)}
    raise ConfigError(f"Hugging Face model_type {kind!r}: import supports gpt2 and llama.")


def _layer_pairs(kind: str, i: int):
    """(megatron name, hf name) pairs mapped by identity within layer ``i``."""
    m, out = f"decoder.layers.{i}.", []
    if kind == "gpt2":
        h = f"transformer.h.{i}."
        for mn, hn in (("input_layernorm", "ln_1"), ("pre_mlp_layernorm", "ln_2")):
            out += [(m + mn + ".weight", h + hn + ".weight"), (m + mn + ".bias", h + hn + ".bias")]
    else:
        h = f"model.layers.{i}."
        out += [(m + "input_layernorm.weight", h + "input_layernorm.weight"),
                (m + "pre_mlp_layernorm.weight", h + "post_attention_layernorm.weight")]
    return out


def to_hf(state: Tensors, cfg) -> Tuple[str, Tensors]:
    """Megatron PP = 1 state dict -> (family, Hugging Face state dict)."""
    kind = family(cfg)
    heads, out = cfg.num_attention_heads, {}
    t = {k: v.detach().to(torch.float32).contiguous() for k, v in state.items()}
    for i in range(cfg.num_layers):
        m = f"decoder.layers.{i}."
        for mn, hn in _layer_pairs(kind, i):
            out[hn] = t[mn]
        q, k, v = _split_qkv(t[m + "self_attention.linear_qkv.weight"], heads)
        if kind == "gpt2":
            h = f"transformer.h.{i}."
            out[h + "attn.c_attn.weight"] = torch.cat([q, k, v]).t()
            out[h + "attn.c_attn.bias"] = torch.cat(
                _split_qkv(t[m + "self_attention.linear_qkv.bias"], heads))
            out[h + "attn.c_proj.weight"] = t[m + "self_attention.linear_proj.weight"].t()
            out[h + "attn.c_proj.bias"] = t[m + "self_attention.linear_proj.bias"]
            out[h + "mlp.c_fc.weight"] = t[m + "mlp.linear_fc1.weight"].t()
            out[h + "mlp.c_fc.bias"] = t[m + "mlp.linear_fc1.bias"]
            out[h + "mlp.c_proj.weight"] = t[m + "mlp.linear_fc2.weight"].t()
            out[h + "mlp.c_proj.bias"] = t[m + "mlp.linear_fc2.bias"]
        else:
            h = f"model.layers.{i}."
            out[h + "self_attn.q_proj.weight"] = q
            out[h + "self_attn.k_proj.weight"] = k
            out[h + "self_attn.v_proj.weight"] = v
            out[h + "self_attn.o_proj.weight"] = t[m + "self_attention.linear_proj.weight"]
            # Megatron's gated fc1 is [gate; up]: act(first half) * second half.
            gate, up = torch.chunk(t[m + "mlp.linear_fc1.weight"], 2, dim=0)
            out[h + "mlp.gate_proj.weight"] = gate
            out[h + "mlp.up_proj.weight"] = up
            out[h + "mlp.down_proj.weight"] = t[m + "mlp.linear_fc2.weight"]
    untied = cfg.untie_embeddings_and_output_weights
    if kind == "gpt2":
        out["transformer.wte.weight"] = t["embedding.word_embeddings.weight"]
        out["transformer.wpe.weight"] = t["embedding.position_embeddings.weight"]
        out["transformer.ln_f.weight"] = t["decoder.final_layernorm.weight"]
        out["transformer.ln_f.bias"] = t["decoder.final_layernorm.bias"]
    else:
        out["model.embed_tokens.weight"] = t["embedding.word_embeddings.weight"]
        out["model.norm.weight"] = t["decoder.final_layernorm.weight"]
    if untied:
        out["lm_head.weight"] = t["output_layer.weight"]
    # safetensors refuses views sharing storage: give every tensor its own.
    return kind, {k: v.contiguous().clone() for k, v in out.items()}


def from_hf(hf: Tensors, cfg) -> Tensors:
    """Hugging Face state dict -> Megatron PP = 1 state dict (inverse of :func:`to_hf`)."""
    kind = family(cfg)
    heads, out = cfg.num_attention_heads, {}
    t = {k: v.detach().to(torch.float32) for k, v in hf.items()}

    def take(name):
        if name not in t:
            raise ConfigError(f"the Hugging Face checkpoint has no tensor {name!r} "
                              f"(expected for a {kind} model of this config).")
        return t[name]

    for i in range(cfg.num_layers):
        m = f"decoder.layers.{i}."
        for mn, hn in _layer_pairs(kind, i):
            out[mn] = take(hn)
        if kind == "gpt2":
            h = f"transformer.h.{i}."
            q, k, v = torch.chunk(take(h + "attn.c_attn.weight").t(), 3, dim=0)
            out[m + "self_attention.linear_qkv.weight"] = _merge_qkv(q, k, v, heads)
            qb, kb, vb = torch.chunk(take(h + "attn.c_attn.bias"), 3)
            out[m + "self_attention.linear_qkv.bias"] = _merge_qkv(qb, kb, vb, heads)
            out[m + "self_attention.linear_proj.weight"] = take(h + "attn.c_proj.weight").t()
            out[m + "self_attention.linear_proj.bias"] = take(h + "attn.c_proj.bias")
            out[m + "mlp.linear_fc1.weight"] = take(h + "mlp.c_fc.weight").t()
            out[m + "mlp.linear_fc1.bias"] = take(h + "mlp.c_fc.bias")
            out[m + "mlp.linear_fc2.weight"] = take(h + "mlp.c_proj.weight").t()
            out[m + "mlp.linear_fc2.bias"] = take(h + "mlp.c_proj.bias")
        else:
            h = f"model.layers.{i}."
            out[m + "self_attention.linear_qkv.weight"] = _merge_qkv(
                take(h + "self_attn.q_proj.weight"), take(h + "self_attn.k_proj.weight"),
                take(h + "self_attn.v_proj.weight"), heads)
            out[m + "self_attention.linear_proj.weight"] = take(h + "self_attn.o_proj.weight")
            out[m + "mlp.linear_fc1.weight"] = torch.cat(
                [take(h + "mlp.gate_proj.weight"), take(h + "mlp.up_proj.weight")])
            out[m + "mlp.linear_fc2.weight"] = take(h + "mlp.down_proj.weight")
    if kind == "gpt2":
        out["embedding.word_embeddings.weight"] = take("transformer.wte.weight")
        out["embedding.position_embeddings.weight"] = take("transformer.wpe.weight")
        out["decoder.final_layernorm.weight"] = take("transformer.ln_f.weight")
        out["decoder.final_layernorm.bias"] = take("transformer.ln_f.bias")
    else:
        out["embedding.word_embeddings.weight"] = take("model.embed_tokens.weight")
        out["decoder.final_layernorm.weight"] = take("model.norm.weight")
    if cfg.untie_embeddings_and_output_weights:
        out["output_layer.weight"] = take("lm_head.weight")
    return {k: v.contiguous() for k, v in out.items()}
