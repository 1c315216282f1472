"""Shared fixtures: a small preprocessed corpus built once per session."""

from __future__ import annotations

import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A 1024-piece tokenizer + .bin/.idx made from 120 stdlib files (~2 MB).

    Built through the same code path as the bundled corpus, small enough to
    make in a few seconds.
    """
    from megatron_asyncmesh.data import corpus
    from megatron_asyncmesh.data.preprocess import preprocess, tokenizer_path_for

    root = tmp_path_factory.mktemp("data")
    prefix = str(root / "stdlib_small")
    docs = list(corpus.iter_bundled())[:120]
    preprocess(docs, prefix, vocab_size=1024, workers=2, source="test", log=lambda m: None)
    return {"data_path": prefix, "tokenizer_model": tokenizer_path_for(prefix)}


@pytest.fixture
def data_args(tiny_data):
    return ["--data-path", tiny_data["data_path"], "--tokenizer-model",
            tiny_data["tokenizer_model"]]
