"""Shared fixtures: a small preprocessed corpus built once per session."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

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


@pytest.fixture(scope="session", autouse=True)
def warm_server():
    """tests/zygote.py's server for the whole session: torch, Megatron-core and DeepSpeed
    imported once; every launch and tool of the harness is forked from it. It starts in
    the background: tests that launch nothing do not wait for it, and the harness waits
    for its socket when it builds the first launch's command (tests/harness.py)."""
    from tests.harness import env_for_ranks
    from tests.zygote import ENV, ENV_PID

    where = tempfile.mkdtemp(prefix="asyncmesh-zygote-")
    path = os.path.join(where, "socket")
    server = subprocess.Popen([sys.executable, os.path.join(REPO, "tests", "zygote.py"),
                               "serve", path], env=env_for_ranks(), cwd=REPO,
                              start_new_session=True, stdout=subprocess.DEVNULL)
    os.environ[ENV], os.environ[ENV_PID] = path, str(server.pid)
    try:
        yield path
    finally:
        os.environ.pop(ENV, None)
        os.environ.pop(ENV_PID, None)
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        shutil.rmtree(where, ignore_errors=True)
