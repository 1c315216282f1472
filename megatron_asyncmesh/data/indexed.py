"""Megatron indexed datasets (``.bin``/``.idx``): written atomically, checked on load.

Writing goes through ``megatron.core.datasets.indexed_dataset.IndexedDatasetBuilder``
into temporary files that are renamed into place only when complete, so an
interrupted run never leaves a pair that looks valid. Before training the
pair is checked here (header, sizes, token range) so a damaged dataset gives
a message that names the file and the fix instead of a numpy traceback.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from typing import Iterable, List, Optional

import numpy as np

# Megatron's index header ("MMIDIDX\x00\x00"), version 1.
_HEADER = b"MMIDIDX\x00\x00"
_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64,
           6: np.float64, 7: np.float32, 8: np.uint16}


class DatasetError(ValueError):
    """A preprocessed dataset is missing, damaged, or inconsistent."""


@dataclass
class IndexInfo:
    prefix: str
    dtype: type
    num_sequences: int
    num_documents: int
    num_tokens: int
    max_token_id: int


def _fix_hint(prefix: str) -> str:
    return (f"Re-create it with `python tools/preprocess_data.py --output-prefix {prefix} ...` "
            f"(or delete it to have the demo rebuild the bundled corpus).")


def check_indexed_dataset(prefix: str, scan_tokens: bool = True) -> IndexInfo:
    """Validate ``prefix.bin``/``prefix.idx``; raise DatasetError naming the problem."""
    idx_path, bin_path = prefix + ".idx", prefix + ".bin"
    for path in (idx_path, bin_path):
        if not os.path.isfile(path):
            raise DatasetError(f"dataset file {path!r} is missing. {_fix_hint(prefix)}")
    idx_size = os.path.getsize(idx_path)
    with open(idx_path, "rb") as f:
        head = f.read(34)
    if len(head) < 34 or head[:9] != _HEADER:
        raise DatasetError(f"{idx_path!r} is not a Megatron index (bad or truncated header, "
                           f"{idx_size} bytes). {_fix_hint(prefix)}")
    version = struct.unpack("<Q", head[9:17])[0]
    code = head[17]
    if version != 1 or code not in _DTYPES:
        raise DatasetError(f"{idx_path!r}: unsupported index version {version} / dtype code "
                           f"{code}. {_fix_hint(prefix)}")
    n_seq, n_doc = struct.unpack("<QQ", head[18:34])
    expected_idx = 34 + n_seq * 4 + n_seq * 8 + n_doc * 8
    if idx_size < expected_idx:
        raise DatasetError(f"{idx_path!r} is truncated: {idx_size} bytes, the header promises "
                           f"{expected_idx}. {_fix_hint(prefix)}")
    lengths = np.memmap(idx_path, dtype=np.int32, mode="r", offset=34, shape=(n_seq,)) \
        if n_seq else np.zeros(0, np.int32)
    dtype = _DTYPES[code]
    num_tokens = int(lengths.sum(dtype=np.int64))
    bin_size = os.path.getsize(bin_path)
    expected_bin = num_tokens * np.dtype(dtype).itemsize
    if bin_size != expected_bin:
        raise DatasetError(f"{bin_path!r} has {bin_size} bytes but its index describes "
                           f"{num_tokens} tokens of {np.dtype(dtype).name} = {expected_bin} "
                           f"bytes (truncated or from another run). {_fix_hint(prefix)}")
    if num_tokens == 0:
        raise DatasetError(f"{bin_path!r} holds no tokens. {_fix_hint(prefix)}")
    max_id = -1
    if scan_tokens:
        max_id = _max_token_id(prefix, bin_path, bin_size, dtype)
    return IndexInfo(prefix, dtype, int(n_seq), int(n_doc) - 1, num_tokens, max_id)


def _max_token_id(prefix: str, bin_path: str, bin_size: int, dtype) -> int:
    """The largest token id of ``prefix.bin``: recorded by the preprocessing in
    ``prefix.meta.json``, or scanned once and recorded in ``prefix.scan.json`` (a
    multi-GB corpus is not re-read by every rank of every run). A record counts only
    for a ``.bin`` of the size and modification time it was made for."""
    stamp = {"bin_bytes": bin_size, "bin_mtime_ns": os.stat(bin_path).st_mtime_ns}
    for path in (prefix + ".meta.json", prefix + ".scan.json"):
        try:
            with open(path) as f:
                rec = json.load(f)
        except (OSError, ValueError):
            continue
        if "max_token_id" in rec and all(rec.get(k) == v for k, v in stamp.items()):
            return int(rec["max_token_id"])
    max_id = int(np.memmap(bin_path, dtype=dtype, mode="r").max())
    tmp = f"{prefix}.scan.json.tmp-{os.getpid()}"
    try:                                  # best effort: a read-only corpus is scanned again
        with open(tmp, "w") as f:
            json.dump({**stamp, "max_token_id": max_id}, f)
        os.replace(tmp, prefix + ".scan.json")
    except OSError:
        if os.path.exists(tmp):
            os.remove(tmp)
    return max_id


def check_vocab(info: IndexInfo, vocab_size: int, tokenizer_path: str) -> None:
    if info.max_token_id >= vocab_size:
        raise DatasetError(
            f"dataset {info.prefix!r} contains token id {info.max_token_id} but tokenizer "
            f"{tokenizer_path!r} has only {vocab_size} pieces (ids 0..{vocab_size - 1}): the "
            f"data was made with a different tokenizer. Pass the matching --tokenizer-model "
            f"or re-run tools/preprocess_data.py with this one.")


def write_indexed_dataset(prefix: str, documents: Iterable[List[int]], vocab_size: int,
                          metadata: Optional[dict] = None) -> IndexInfo:
    """Write documents (lists of token ids) as ``prefix.bin/.idx`` atomically.

    The pair is built under temporary names and renamed into place (``.bin``
    first, ``.idx`` second, ``.meta.json`` last), so readers never see a
    half-written dataset; a failure removes the temporaries and leaves any
    previous dataset at ``prefix`` untouched.
    """
    import torch
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    dtype = DType.optimal_dtype(vocab_size)
    tmp = f"{prefix}.tmp-{os.getpid()}"
    tmp_bin, tmp_idx = tmp + ".bin", tmp + ".idx"
    try:
        builder = IndexedDatasetBuilder(tmp_bin, dtype=dtype)
        count = 0
        for ids in documents:
            if not ids:
                continue
            builder.add_document(torch.tensor(ids, dtype=torch.int64), [len(ids)])
            count += 1
        if count == 0:
            raise DatasetError("no non-empty documents to write.")
        builder.finalize(tmp_idx)
        info = check_indexed_dataset(tmp, scan_tokens=True)
        if info.max_token_id >= vocab_size:
            raise DatasetError(f"token id {info.max_token_id} >= vocab size {vocab_size}.")
        meta = dict(metadata or {}, num_documents=info.num_documents,
                    num_tokens=info.num_tokens, vocab_size=vocab_size,
                    dtype=np.dtype(info.dtype).name, max_token_id=info.max_token_id)
        with open(tmp + ".meta.json", "w") as f:
            json.dump(meta, f, indent=2, sort_keys=True)
        os.replace(tmp_bin, prefix + ".bin")
        os.replace(tmp_idx, prefix + ".idx")
        # The token scan's record is valid for the renamed .bin (same size and mtime).
        bin_stat = os.stat(prefix + ".bin")
        meta.update(bin_bytes=bin_stat.st_size, bin_mtime_ns=bin_stat.st_mtime_ns)
        with open(tmp + ".meta.json", "w") as f:
            json.dump(meta, f, indent=2, sort_keys=True)
        os.replace(tmp + ".meta.json", prefix + ".meta.json")
    finally:
        for path in (tmp_bin, tmp_idx, tmp + ".meta.json"):
            if os.path.exists(path):
                os.remove(path)
    info.prefix = prefix
    return info
