"""Text -> SentencePiece tokenizer -> Megatron indexed dataset.

Used by ``tools/preprocess_data.py`` and by the demo (which prepares the
bundled corpus when it is missing). Output for ``--output-prefix P``:
``P.bin``, ``P.idx``, ``P.meta.json`` and, when a tokenizer is trained,
``P.tokenizer.model``. Each document ends with the tokenizer's EOD id so
Megatron's GPTDataset can pack documents into fixed-length samples.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from typing import List, Optional, Sequence

from megatron_asyncmesh.data import corpus as corpus_mod
from megatron_asyncmesh.data.indexed import IndexInfo, write_indexed_dataset
from megatron_asyncmesh.data.tokenizer import load_processor, train_sentencepiece

DEFAULT_VOCAB = 4096


def default_data_root() -> str:
    return os.environ.get("ASYNCMESH_DATA_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "megatron-asyncmesh", "data")


def bundled_prefix(root: Optional[str] = None, vocab_size: int = DEFAULT_VOCAB) -> str:
    """Where the bundled corpus lives once preprocessed."""
    return os.path.join(root or default_data_root(), corpus_mod.bundled_corpus_id(),
                        f"stdlib_sp{vocab_size}")


def tokenizer_path_for(prefix: str) -> str:
    return prefix + ".tokenizer.model"


def preprocess(documents: Sequence[corpus_mod.Document], output_prefix: str,
               tokenizer_model: Optional[str] = None, vocab_size: int = DEFAULT_VOCAB,
               workers: int = 2, source: str = "", log=print) -> IndexInfo:
    t0 = time.time()
    if not documents:
        raise ValueError("the input holds no non-empty documents.")
    texts = [d.text for d in documents]
    trained_tmp = None
    if tokenizer_model is None:
        # Trained tokenizers are written next to the data, under a temporary
        # name until the dataset is complete.
        log(f"training a {vocab_size}-piece SentencePiece tokenizer on "
            f"{len(texts)} documents ...")
        proto = train_sentencepiece(texts, vocab_size, threads=workers)
        final_tok = tokenizer_path_for(output_prefix)
        os.makedirs(os.path.dirname(os.path.abspath(final_tok)), exist_ok=True)
        trained_tmp = f"{final_tok}.tmp-{os.getpid()}"
        with open(trained_tmp, "wb") as f:
            f.write(proto)
    else:
        final_tok = tokenizer_model
    try:
        proc = load_processor(trained_tmp or tokenizer_model)
        eod = proc.eos_id()
        if eod < 0:
            raise ValueError(f"tokenizer {final_tok!r} has no end-of-sequence piece; "
                             f"Megatron needs one as the document separator (EOD).")
        log(f"tokenizing {sum(map(len, texts)) / 1e6:.1f} MB with {workers} threads ...")
        ids: List[List[int]] = proc.encode(texts, num_threads=workers)
        with open(trained_tmp or tokenizer_model, "rb") as f:
            tok_sha1 = hashlib.sha1(f.read()).hexdigest()
        meta = {"source": source, "tokenizer_model": os.path.abspath(final_tok),
                "tokenizer_sha1": tok_sha1, "eod_id": eod, "python": sys.version.split()[0]}
        info = write_indexed_dataset(output_prefix, (doc + [eod] for doc in ids),
                                     vocab_size=proc.get_piece_size(), metadata=meta)
        if trained_tmp:
            os.replace(trained_tmp, final_tok)
    finally:
        if trained_tmp and os.path.exists(trained_tmp):
            os.remove(trained_tmp)
    log(f"wrote {output_prefix}.bin/.idx: {info.num_documents} documents, "
        f"{info.num_tokens / 1e6:.2f} M tokens in {time.time() - t0:.0f} s")
    return info


def ensure_bundled(root: Optional[str] = None, vocab_size: int = DEFAULT_VOCAB,
                   workers: int = 2, log=print) -> str:
    """Build the bundled-corpus dataset if it is missing; return its prefix."""
    from megatron_asyncmesh.data.indexed import DatasetError, check_indexed_dataset

    prefix = bundled_prefix(root, vocab_size)
    if os.path.exists(prefix + ".meta.json") and os.path.exists(tokenizer_path_for(prefix)):
        try:
            check_indexed_dataset(prefix, scan_tokens=False)
            return prefix
        except DatasetError as exc:
            log(f"rebuilding the bundled corpus: {exc}")
    log(f"preparing the bundled corpus ({corpus_mod.bundled_corpus_id()}) at {prefix}")
    docs = list(corpus_mod.iter_bundled())
    preprocess(docs, prefix, vocab_size=vocab_size, workers=workers,
               source=f"bundled:{corpus_mod.bundled_corpus_id()}", log=log)
    return prefix


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="asyncmesh-preprocess",
        description="Tokenize text into a Megatron indexed dataset (.bin/.idx). With no "
                    "--input, the bundled corpus (this interpreter's standard library) is used.")
    p.add_argument("--input", nargs="*", default=None,
                   help="text files (one document each) or .jsonl files (one per line)")
    p.add_argument("--json-keys", nargs="+", default=["text"], help="JSON keys holding text")
    p.add_argument("--output-prefix", default=None,
                   help="output prefix (default for the bundled corpus: "
                        "~/.cache/megatron-asyncmesh/data/<corpus id>/stdlib_sp<vocab>)")
    p.add_argument("--tokenizer-model", default=None,
                   help="existing SentencePiece model; otherwise one is trained")
    p.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB,
                   help="pieces of the trained tokenizer")
    p.add_argument("--workers", type=int, default=max(1, min(os.cpu_count() or 1, 8)))
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.input:
            if not args.output_prefix:
                raise ValueError("--output-prefix is required with --input.")
            docs = list(corpus_mod.iter_user_files(args.input, args.json_keys))
            source = ",".join(os.path.abspath(p) for p in args.input)
        else:
            docs = list(corpus_mod.iter_bundled())
            source = f"bundled:{corpus_mod.bundled_corpus_id()}"
        prefix = args.output_prefix or bundled_prefix(vocab_size=args.vocab_size)
        preprocess(docs, prefix, tokenizer_model=args.tokenizer_model,
                   vocab_size=args.vocab_size, workers=args.workers, source=source)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"--data-path {prefix} --tokenizer-model "
          f"{args.tokenizer_model or tokenizer_path_for(prefix)}")
    return 0
