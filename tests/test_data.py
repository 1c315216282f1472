"""Data pipeline: deterministic corpus, Megatron read-back, clear errors, no partial files."""

import glob
import hashlib
import json
import os

import numpy as np
import pytest

from megatron_asyncmesh.data import corpus
from megatron_asyncmesh.data.indexed import DatasetError, check_indexed_dataset, check_vocab
from megatron_asyncmesh.data.preprocess import main as preprocess_main
from megatron_asyncmesh.data.preprocess import preprocess, tokenizer_path_for


def _sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_bundled_corpus_is_large_and_deterministically_ordered():
    files = corpus.bundled_files()
    assert files == corpus.bundled_files()
    assert len(files) > 500
    assert not any("site-packages" in f for f in files)
    # Ordered by SHA-1 of the path, so packages are spread over the order.
    keys = [hashlib.sha1(f.encode()).hexdigest() for f in files]
    assert keys == sorted(keys)
    total = sum(os.path.getsize(os.path.join(corpus.stdlib_root(), f)) for f in files)
    assert total > 10e6  # tens of MB of real text


def test_same_input_builds_byte_identical_dataset(tmp_path):
    docs = list(corpus.iter_bundled())[:40]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    for prefix in (a, b):
        preprocess(docs, prefix, vocab_size=512, workers=2, log=lambda m: None)
    for ext in (".bin", ".idx", ".tokenizer.model"):
        assert _sha(a + ext) == _sha(b + ext), ext


def test_megatron_gpt_dataset_reads_back_our_tokens(tiny_data):
    import megatron_asyncmesh  # noqa: F401
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_asyncmesh.data.tokenizer import load_processor

    prefix = tiny_data["data_path"]
    sp = load_processor(tiny_data["tokenizer_model"])
    ds = IndexedDataset(prefix)
    docs = list(corpus.iter_bundled())[:120]
    assert len(ds) == len(docs)
    for i in (0, 7, len(docs) - 1):
        expected = sp.encode(docs[i].text) + [sp.eos_id()]
        assert ds[i].tolist() == expected
    meta = json.load(open(prefix + ".meta.json"))
    assert meta["num_documents"] == len(docs) and meta["eod_id"] == sp.eos_id()


def test_jsonl_input_and_existing_tokenizer(tmp_path, tiny_data, capsys):
    src = tmp_path / "docs.jsonl"
    src.write_text("\n".join(json.dumps({"text": f"def f{i}():\n    return {i}\n"})
                             for i in range(30)))
    prefix = str(tmp_path / "mine")
    assert preprocess_main(["--input", str(src), "--output-prefix", prefix,
                            "--tokenizer-model", tiny_data["tokenizer_model"]]) == 0
    info = check_indexed_dataset(prefix)
    assert info.num_documents == 30
    assert not os.path.exists(tokenizer_path_for(prefix))  # reused, not trained
    assert f"--data-path {prefix}" in capsys.readouterr().out


def test_bad_jsonl_writes_nothing(tmp_path, tiny_data, capsys):
    src = tmp_path / "bad.jsonl"
    src.write_text('{"text": "ok"}\n{"body": "no text key"}\n')
    prefix = str(tmp_path / "out")
    assert preprocess_main(["--input", str(src), "--output-prefix", prefix,
                            "--tokenizer-model", tiny_data["tokenizer_model"]]) == 2
    assert "key 'text' missing" in capsys.readouterr().err
    assert glob.glob(prefix + "*") == []


def _copy(tiny_data, tmp_path):
    import shutil

    dst = str(tmp_path / "copy")
    for ext in (".bin", ".idx"):
        shutil.copy(tiny_data["data_path"] + ext, dst + ext)
    return dst


def test_missing_bin_is_named(tmp_path, tiny_data):
    prefix = _copy(tiny_data, tmp_path)
    os.remove(prefix + ".bin")
    with pytest.raises(DatasetError, match=r"copy.bin' is missing.*preprocess_data.py"):
        check_indexed_dataset(prefix)


def test_truncated_bin_and_idx_are_detected(tmp_path, tiny_data):
    prefix = _copy(tiny_data, tmp_path)
    size = os.path.getsize(prefix + ".bin")
    with open(prefix + ".bin", "r+b") as f:
        f.truncate(size - 10)
    with pytest.raises(DatasetError, match=rf"has {size - 10} bytes but its index describes"):
        check_indexed_dataset(prefix)
    prefix = _copy(tiny_data, tmp_path)
    with open(prefix + ".idx", "r+b") as f:
        f.truncate(100)
    with pytest.raises(DatasetError, match="is truncated: 100 bytes"):
        check_indexed_dataset(prefix)
    with open(prefix + ".idx", "wb") as f:
        f.write(b"garbage")
    with pytest.raises(DatasetError, match="not a Megatron index"):
        check_indexed_dataset(prefix)


def test_vocab_smaller_than_token_ids(tiny_data):
    info = check_indexed_dataset(tiny_data["data_path"])
    assert info.max_token_id < 1024
    with pytest.raises(DatasetError, match=rf"contains token id {info.max_token_id} but "
                                           rf"tokenizer 'small.model' has only 100 pieces"):
        check_vocab(info, 100, "small.model")


def test_training_refuses_mismatched_tokenizer(tmp_path, tiny_data):
    """End to end: data made with a 1024-piece tokenizer, trained with a 512-piece one."""
    from tests.harness import train

    small = str(tmp_path / "small")
    docs = list(corpus.iter_bundled())[:20]
    preprocess(docs, small, vocab_size=512, workers=2, log=lambda m: None)
    res = train(str(tmp_path / "run"), 1, ["--data-path", tiny_data["data_path"],
                                           "--tokenizer-model", tokenizer_path_for(small)],
                check=False, timeout=120)
    assert res.returncode != 0 and not res.timed_out, res.tail()
    assert "has only 512 pieces" in res.output
    assert not os.path.exists(tmp_path / "run" / "summary.json")


def test_token_dtype_fits_vocab(tiny_data):
    info = check_indexed_dataset(tiny_data["data_path"])
    assert info.dtype == np.uint16


def test_microbatch_order_is_layout_independent():
    """The samples of one optimizer step are the same for every DP size:
    DP = 2 ranks together cover exactly what DP = 1 sees, microbatch by microbatch."""
    from megatron_asyncmesh.data.datasets import microbatch_indices

    single = microbatch_indices(32, micro_batch_size=2, dp_rank=0, dp_size=1,
                                num_microbatches=8)
    r0 = microbatch_indices(32, 2, 0, 2, 4)
    r1 = microbatch_indices(32, 2, 1, 2, 4)
    assert sorted(i for mb in single for i in mb) == list(range(32, 48))
    assert sorted(i for mb in r0 + r1 for i in mb) == list(range(32, 48))
    # Megatron-LM's sampler: rank r takes slice r of each (mb x DP) chunk.
    assert r0[0] == [32, 33] and r1[0] == [34, 35] and r0[1] == [36, 37]
