"""Megatron GPT datasets and the microbatch iterators that feed the schedule.

Datasets come from Megatron-core's ``BlendedMegatronDatasetBuilder`` +
``GPTDataset`` over one preprocessed prefix, split by documents
(``--split``). Sample order follows Megatron-LM's pretraining sampler: the
global batch starting at sample ``s`` is cut into microbatches, and
microbatch ``m`` of data-parallel rank ``r`` holds samples
``s + (m * DP + r) * mb ... + mb - 1``. So PP = 1, PP = 2 and PP x DP runs see
the same samples per optimizer step, which the parity tests rely on.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional

import torch

from megatron_asyncmesh.data.indexed import DatasetError, check_indexed_dataset, check_vocab
from megatron_asyncmesh.data.preprocess import ensure_bundled, tokenizer_path_for
from megatron_asyncmesh.data.tokenizer import load_megatron_tokenizer

Batch = Dict[str, torch.Tensor]


@dataclass
class GPTData:
    train: object
    valid: Optional[object]
    tokenizer: object
    vocab_size: int


def build_gpt_datasets(data_path: str, tokenizer_model: str, seq_length: int, seed: int,
                       split: str, train_samples: int, valid_samples: int,
                       cache_path: Optional[str], needs_data: bool) -> GPTData:
    """Build train/valid GPTDatasets with Megatron-core (collective: call on all ranks)."""
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    info = check_indexed_dataset(data_path, scan_tokens=True)
    tokenizer = load_megatron_tokenizer(tokenizer_model)
    check_vocab(info, tokenizer.vocab_size, tokenizer_model)
    config = GPTDatasetConfig(
        random_seed=seed, sequence_length=seq_length, blend=([data_path], None), split=split,
        path_to_cache=cache_path or os.path.join(os.path.dirname(os.path.abspath(data_path)),
                                                 "cache"),
        tokenizer=tokenizer, reset_position_ids=False, reset_attention_mask=False,
        eod_mask_loss=False, create_attention_mask=False, mmap_bin_files=True)
    train, valid, _ = BlendedMegatronDatasetBuilder(
        GPTDataset, [train_samples, valid_samples, None], lambda: needs_data, config).build()
    return GPTData(train, valid, tokenizer, tokenizer.vocab_size)


def microbatch_indices(start: int, micro_batch_size: int, dp_rank: int, dp_size: int,
                       num_microbatches: int) -> List[List[int]]:
    """Sample indices of one optimizer step for one data-parallel rank."""
    out = []
    for m in range(num_microbatches):
        first = start + (m * dp_size + dp_rank) * micro_batch_size
        out.append(list(range(first, first + micro_batch_size)))
    return out


def _collate(dataset, indices: List[int]) -> Batch:
    items = [dataset[i % len(dataset)] for i in indices]
    return {key: torch.stack([torch.as_tensor(it[key]) for it in items])
            for key in ("tokens", "labels", "loss_mask", "position_ids")}


def train_iterator(dataset, micro_batch_size: int, dp_rank: int, dp_size: int,
                   num_microbatches: int, consumed_samples: int = 0) -> Iterator[Batch]:
    """Endless microbatches, resuming after ``consumed_samples`` (global count).

    Megatron builds the training split with ``train_iters x global_batch``
    samples; indices wrap around only if a run goes past that.
    """
    global_batch = micro_batch_size * dp_size * num_microbatches
    start = consumed_samples
    while True:
        for idx in microbatch_indices(start, micro_batch_size, dp_rank, dp_size,
                                      num_microbatches):
            yield _collate(dataset, idx)
        start += global_batch


def eval_microbatches(dataset, micro_batch_size: int, dp_rank: int, dp_size: int,
                      num_microbatches: int, eval_iters: int) -> List[Batch]:
    """The fixed validation set: the first ``eval_iters`` global batches."""
    global_batch = micro_batch_size * dp_size * num_microbatches
    batches = []
    for it in range(eval_iters):
        for idx in microbatch_indices(it * global_batch, micro_batch_size, dp_rank, dp_size,
                                      num_microbatches):
            batches.append(_collate(dataset, idx))
    return batches


# --- the run's data, as every entry point builds it ---------------------------------
def resolve_data(cfg) -> None:
    """Fill in ``cfg``'s --data-path (the bundled corpus, prepared by rank 0 once) and
    --tokenizer-model defaults (collective)."""
    import json

    import torch.distributed as dist

    if cfg.data_path is None:
        # Rank 0 prepares the bundled corpus once; the others wait for it.
        error = None
        if dist.get_rank() == 0:
            try:
                cfg.data_path = ensure_bundled()
            except Exception as exc:  # broadcast, so every rank stops together
                error = f"could not prepare the bundled corpus: {exc}"
        box = [cfg.data_path, error]
        dist.broadcast_object_list(box, src=0)
        cfg.data_path, error = box
        if error:
            raise DatasetError(error)
    if cfg.tokenizer_model is None:
        candidate = tokenizer_path_for(cfg.data_path)
        meta_path = cfg.data_path + ".meta.json"
        if not os.path.isfile(candidate) and os.path.isfile(meta_path):
            with open(meta_path) as f:
                candidate = json.load(f).get("tokenizer_model", candidate)
        if not os.path.isfile(candidate):
            raise DatasetError(
                f"no tokenizer found for --data-path {cfg.data_path!r} (looked for "
                f"{candidate!r}); pass --tokenizer-model.")
        cfg.tokenizer_model = candidate


def build_run_datasets(cfg, needs_data: bool = True) -> "GPTData":
    """The run's train / valid GPTDatasets, as every entry point builds them (after
    :func:`resolve_data`; collective). ``tools/evaluate.py`` relies on getting the same
    validation samples as training."""
    gb = cfg.global_batch_size
    return build_gpt_datasets(
        cfg.data_path, cfg.tokenizer_model, cfg.seq_length, cfg.seed, cfg.split,
        train_samples=cfg.train_iters * gb, valid_samples=max(1, cfg.eval_iters) * gb,
        cache_path=cfg.data_cache_path, needs_data=needs_data)
