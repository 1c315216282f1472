"""SentencePiece tokenizers: train one on a corpus, load one for Megatron.

Training settings suit source code and prose alike: identity normalisation
(whitespace is meaningful in code), byte fallback (no unknown characters),
newline and indentation as single pieces. Special ids are fixed:
unk = 0, bos = 1, eos = 2 (Megatron's ``eod``), pad = 3.
"""

from __future__ import annotations

import io
import os
from typing import Iterable, List

import sentencepiece as spm

EOD_ID = 2
PAD_ID = 3
_MAX_TRAIN_LINES = 200_000


def training_lines(texts: Iterable[str], max_lines: int = _MAX_TRAIN_LINES) -> List[str]:
    """A deterministic, evenly spread subset of the non-empty lines."""
    lines = [line for text in texts for line in text.split("\n") if line.strip()]
    step = max(1, len(lines) // max_lines)
    return lines[::step]


def train_sentencepiece(texts: Iterable[str], vocab_size: int, threads: int = 2) -> bytes:
    """Train a BPE SentencePiece model; returns the serialized model proto.

    Deterministic for the same input (no sampling: the caller's line subset
    is used whole).
    """
    if vocab_size < 300:
        raise ValueError(f"--vocab-size {vocab_size} is too small: byte fallback alone needs "
                         f"260 pieces; use >= 1024.")
    writer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(training_lines(texts)), model_writer=writer,
        vocab_size=vocab_size, model_type="bpe", normalization_rule_name="identity",
        remove_extra_whitespaces=False, split_digits=True, byte_fallback=True,
        allow_whitespace_only_pieces=True, user_defined_symbols=["\n", "    ", "        "],
        unk_id=0, bos_id=1, eos_id=EOD_ID, pad_id=PAD_ID, input_sentence_size=0,
        num_threads=threads, max_sentence_length=16384, minloglevel=2)
    return writer.getvalue()


def load_processor(path: str) -> spm.SentencePieceProcessor:
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"tokenizer model {path!r} not found: pass --tokenizer-model with the "
            f".model file used to preprocess the data.")
    proc = spm.SentencePieceProcessor()
    try:
        proc.Load(path)
    except (OSError, RuntimeError) as exc:
        raise ValueError(f"{path!r} is not a SentencePiece model: {exc}") from None
    return proc


def load_megatron_tokenizer(path: str):
    """Megatron-core's own SentencePiece tokenizer object (``.eod``, ``.vocab_size``)."""
    from megatron.core.tokenizers import MegatronTokenizer

    load_processor(path)  # clear error for a missing or foreign file
    return MegatronTokenizer.from_pretrained(
        tokenizer_path=path, metadata_path={"library": "sentencepiece"})
