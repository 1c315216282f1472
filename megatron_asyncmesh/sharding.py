"""Checkpoint keys for per-parameter state that is not shaped or sharded like the
parameter's own ShardedTensor (SOAP's factors, weight versions held by some stages
only): one standalone tensor per parameter, under a key that names it uniquely."""

from __future__ import annotations

from typing import Dict

import torch


def sharded_params(model_sharded_state_dict) -> Dict[int, object]:
    """id(model parameter) -> its ShardedTensor in the model's sharded state dict."""
    from types import SimpleNamespace

    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    out = {}
    for v in nested_values(model_sharded_state_dict):
        if isinstance(v, ShardedTensor) and isinstance(v.data, torch.Tensor):
            out.setdefault(id(v.data), v)
        elif isinstance(v, ShardedTensorFactory) and isinstance(v.data, torch.Tensor):
            # e.g. SwiGLU's fc1, saved as two halves: its key, and the layer offsets
            # (prepended axes) of the halves it builds.
            part = next(t for t in nested_values(v.build()) if isinstance(t, ShardedTensor))
            out.setdefault(id(v.data), SimpleNamespace(
                key=v.key, global_offset=part.global_offset,
                prepend_axis_num=part.prepend_axis_num))
    return out


def unique_key(prefix: str, sharded_param) -> str:
    """Megatron stacks the layers of one key along prepended axes (the layer number is
    an offset there) and TP ranks hold different shards: both go into the key."""
    from megatron.core import parallel_state

    stacked = "".join(f".{o}" for o in sharded_param.global_offset[
        :sharded_param.prepend_axis_num])
    tp = parallel_state.get_tensor_model_parallel_world_size()
    suffix = f".tp{parallel_state.get_tensor_model_parallel_rank()}" if tp > 1 else ""
    return f"{prefix}.{sharded_param.key}{stacked}{suffix}"


def standalone(key: str, tensor: torch.Tensor, replica_id: int):
    """A whole tensor under its own key (written by replica 0 only)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    return ShardedTensor.from_rank_offsets(key, tensor, replica_id=replica_id)
