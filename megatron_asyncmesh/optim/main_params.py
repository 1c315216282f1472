"""Where a Megatron optimizer keeps the parameters it updates.

Under ``--bf16`` Megatron's ``Float16OptimizerWithFloat16Params`` (replicated, and each
shard of the layer-wise optimizer) updates fp32 *main* copies and then copies them into
the bf16 model parameters; in fp32 the model parameters are the main parameters. Anything
that changes parameters after the optimizer step (error feedback, sparse averaging) must
change the main copies, or the next main-to-model copy erases it.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import torch


def leaf_optimizers(optimizer) -> list:
    """The Megatron optimizers inside wrappers (error feedback) and chains (Muon / SOAP
    with their AdamW part, the layer-wise optimizer)."""
    chained = getattr(optimizer, "chained_optimizers", None)
    if chained is not None:       # before ``.optimizer``: a chain of several asserts there
        return [leaf for o in chained for leaf in leaf_optimizers(o)]
    inner = getattr(optimizer, "optimizer", None)
    if inner is not None and not isinstance(inner, torch.optim.Optimizer):
        return leaf_optimizers(inner)          # wrappers around Megatron's
    return [optimizer]


def main_params(optimizer) -> Tuple[Dict[int, torch.Tensor], List]:
    """``{id(model parameter): its fp32 main parameter}`` for the parameters a
    mixed-precision optimizer keeps main copies of, and those optimizers (call
    ``_copy_main_params_to_model_params()`` on them after changing main parameters).
    Parameters without an entry are updated in place (fp32)."""
    main_of, refresh = {}, []
    for leaf in leaf_optimizers(optimizer):
        if hasattr(leaf, "float16_groups"):
            for model_group, main_group in zip(leaf.float16_groups,
                                               leaf.fp32_from_float16_groups):
                for mp, main in zip(model_group, main_group):
                    main_of[id(mp)] = main
            refresh.append(leaf)
        elif getattr(getattr(leaf, "config", None), "bf16", False) and \
                hasattr(leaf, "shard_fp32_from_float16_groups"):
            raise NotImplementedError(
                "Megatron's flat DistributedOptimizer keeps only a shard of each main "
                "parameter on a rank; corrections after the optimizer step (error feedback, "
                "sparse averaging) cannot reach the other shards. Use "
                "--use-layer-wise-distributed-optimizer or drop --use-distributed-optimizer.")
    return main_of, refresh


def copy_main_to_model(refresh: List) -> None:
    for leaf in refresh:
        leaf._copy_main_params_to_model_params()
