"""tools/convert_checkpoint.py and tools/evaluate.py on real checkpoints.

One Llama-style model (rope, RMSNorm, SwiGLU, untied) is trained at P = 4 with the
no-flush 2bw pipeline and resharded 4 -> 2 -> 1; its P = 2 copy is exported to
Hugging Face and imported back. (GPT-2 style export from DeepSpeed ZeRO-3:
tests/test_dataparallel.py::test_zero3_baseline_is_megatron_data_parallel.) Every number is compared with
the training run's own evaluation or the Megatron model's logits.
"""

import json
import os
import pickle
import shutil
import subprocess

import pytest

from tests.harness import REPO, env_for_ranks, evaluate, python_cmd, read_summary, tool, train

LLAMA = ["--position-embedding-type", "rope", "--normalization", "RMSNorm", "--swiglu",
         "--untie-embeddings-and-output-weights"]
STEPS = ["--train-iters", "6", "--lr-warmup-iters", "1", "--eval-interval", "100",
         "--eval-iters", "2"]


COMPARE = r"""
import json, sys
import megatron_asyncmesh
import torch
from megatron.core import dist_checkpointing
from megatron_asyncmesh.checkpoint.convert import iteration_dir, single_process
from megatron_asyncmesh.config import TrainConfig

def flat(d, pre=""):
    out = {}
    for k, v in d.items():
        out.update(flat(v, pre + k + "/") if isinstance(v, dict) else {pre + k: v})
    return out

with single_process(TrainConfig()):
    ref = flat(dist_checkpointing.load_plain_tensors(iteration_dir(sys.argv[1])))
    report = {}
    for other in sys.argv[2:]:
        got = flat(dist_checkpointing.load_plain_tensors(iteration_dir(other)))
        tensors = [k for k, v in ref.items() if isinstance(v, torch.Tensor)]
        report[other] = {
            "missing": sorted(k for k in tensors if k not in got),
            "different": sorted(k for k in tensors if k in got and not torch.equal(ref[k], got[k])),
            "compared": len(tensors),
            "groups": sorted({k.split(".")[0] for k in tensors if k in got})}
print(json.dumps(report))
"""


def compare_checkpoints(reference, *others):
    proc = subprocess.run(python_cmd("-c", COMPARE, reference, *others),
                          capture_output=True, text=True, env=env_for_ranks(), cwd=REPO,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory, tiny_data):
    root = tmp_path_factory.mktemp("llama")
    run = str(root / "run")
    data = ["--data-path", tiny_data["data_path"], "--tokenizer-model",
            tiny_data["tokenizer_model"]]
    train(run, 4, [*data, *STEPS, *LLAMA, "--pipeline-model-parallel-size", "4",
                   "--pipeline-schedule", "2bw", "--save", str(root / "pp4")])
    tool("convert_checkpoint.py", "reshard", "--input", str(root / "pp4"), "--output",
         str(root / "pp2"), "--pipeline-model-parallel-size", "2")
    return {"root": root, "run": run, "pp4": str(root / "pp4"), "pp2": str(root / "pp2"),
            "data": data}


def test_reshard_4_2_1_is_lossless(llama_run):
    """P = 4 -> 2 -> 1: every tensor (weights, Adam moments, 2bw's previous weights)
    bitwise equal, so the validation loss is identical, and equal to what the P = 4
    training run itself measured."""
    pp2, pp1 = llama_run["pp2"], str(llama_run["root"] / "pp1")
    tool("convert_checkpoint.py", "reshard", "--input", pp2, "--output", pp1,
         "--pipeline-model-parallel-size", "1")
    metas = [json.load(open(os.path.join(d, "iter_0000006", "asyncmesh_meta.json")))
             for d in (pp2, pp1)]
    assert [m["layout"]["pipeline_model_parallel_size"] for m in metas] == [2, 1]
    assert all(m["layout"]["pipeline_schedule"] == "2bw" for m in metas)
    report = compare_checkpoints(llama_run["pp4"], pp2, pp1)
    for other, r in report.items():
        assert r["compared"] > 40 and not r["missing"] and not r["different"], (other, r)
        # weights, Adam's moments, 2bw's previous weights
        assert {"embedding", "decoder", "output_layer", "optimizer", "pipeline"} <= \
            set(r["groups"]), r["groups"]
    # Identical tensors, identical loss: evaluated unsplit, P = 1 gives what the P = 4
    # training run measured (its pipeline reduces the same sums in another order).
    loss = evaluate("--checkpoint", pp1)["val_loss"]
    assert loss == pytest.approx(read_summary(llama_run["run"])["final_val_loss"], abs=1e-6)


def test_hf_export_parity_and_round_trip(llama_run, tiny_data):
    """Llama-style export of a P = 2 checkpoint: transformers' logits within 1e-4 of the
    Megatron model's, the same validation loss, the tokenizer gives SentencePiece's
    ids; importing the export gives back every weight bitwise, and an asynchronous
    (2bw) run continues from the import, starting at the exported model's loss."""
    import sentencepiece as spm
    from transformers import AutoConfig, AutoTokenizer

    root = llama_run["root"]
    hf, back = str(root / "hf"), str(root / "imported")
    tool("convert_checkpoint.py", "hf-export", "--input", llama_run["pp2"], "--output", hf)
    assert AutoConfig.from_pretrained(hf).model_type == "llama"
    mine = evaluate("--checkpoint", llama_run["pp2"], "--logits-out", str(root / "m.pt"))
    theirs = evaluate("--hf", hf, "--logits-out", str(root / "h.pt"))
    import torch

    a, b = torch.load(str(root / "m.pt")), torch.load(str(root / "h.pt"))
    assert torch.equal(a["tokens"], b["tokens"])
    diff = float((a["logits"] - b["logits"]).abs().max())
    assert diff <= 1e-4, diff
    assert theirs["val_loss"] == pytest.approx(mine["val_loss"], abs=1e-5)

    tok = AutoTokenizer.from_pretrained(hf)
    sp = spm.SentencePieceProcessor(model_file=tiny_data["tokenizer_model"])
    with open(os.path.join(REPO, "megatron_asyncmesh", "train.py")) as f:
        text = f.read()[:4000] + "\n\t tabs  and   spaces \u00fc\U0001F600\n"
    assert tok(text, add_special_tokens=False)["input_ids"] == sp.encode(text)
    assert tok.decode(sp.encode(text)) == text

    tool("convert_checkpoint.py", "hf-import", "--input", hf, "--output", back)
    meta = json.load(open(os.path.join(back, "iter_0000000", "asyncmesh_meta.json")))
    assert meta["contents"] == "model"
    report = compare_checkpoints(back, llama_run["pp2"])[llama_run["pp2"]]
    # Layers stacked (one tensor per kind): the word embedding, 6 layer tensors (2 norms,
    # QKV, projection, SwiGLU fc1, fc2), the final norm, the output layer.
    assert report["compared"] == 9 and not report["missing"] and not report["different"]
    assert report["groups"] == ["decoder", "embedding", "output_layer"]

    cont = str(root / "continued")
    train(cont, 2, [*llama_run["data"], *LLAMA, "--pipeline-model-parallel-size", "2",
                    "--pipeline-schedule", "2bw", "--train-iters", "2", "--lr-warmup-iters",
                    "1", "--eval-interval", "100", "--eval-iters", "2", "--load", back])
    history = read_summary(cont)["val_loss_history"]
    assert history[0]["step"] == 0 and history[-1]["step"] == 2
    assert history[0]["val_loss"] == pytest.approx(theirs["val_loss"], abs=1e-5)

    # bf16 (fp32 main weights in the optimizer) with sparse averaging and an outer step
    # (its anchor): both were copied from the initial weights before the import was
    # loaded, and the first step used to write the initial weights back (the loss
    # jumped to the untrained model's).
    cont16 = str(root / "continued-bf16")
    train(cont16, 2, [*llama_run["data"], *LLAMA, "--bf16", "--optimizer", "muon",
                      "--dp-averaging", "sparse", "--dp-fraction", "0.5", "--dp-delay", "0",
                      "--dp-outer-lr", "1.5", "--train-iters", "3", "--lr",
                      "1e-4", "--lr-warmup-iters", "1", "--eval-interval", "1",
                      "--eval-iters", "2", "--load", back])
    losses = [h["val_loss"] for h in read_summary(cont16)["val_loss_history"]]
    untrained = read_summary(llama_run["run"])["val_loss_history"][0]["val_loss"]
    assert len(losses) == 4 and losses[0] == pytest.approx(theirs["val_loss"], abs=0.02)
    assert max(abs(x - losses[0]) for x in losses) < 0.1 * (untrained - losses[0]), \
        (losses, untrained)


# ----------------------------------------------------------------------------- bad input
def test_bad_inputs_are_refused_and_leave_nothing(tmp_path, llama_run):
    from megatron_asyncmesh.checkpoint import convert
    from megatron_asyncmesh.checkpoint.integrity import CheckpointError
    from megatron_asyncmesh.config import ConfigError

    src = str(tmp_path / "src")
    shutil.copytree(llama_run["pp4"], src)
    out = str(tmp_path / "out")
    with pytest.raises(ConfigError, match="does not divide"):
        convert.reshard(src, out, 3)
    with pytest.raises(ConfigError, match="not a Hugging Face"):
        convert.import_hf(str(tmp_path), out)
    with pytest.raises(ConfigError, match="exists"):
        convert.export_hf(src, src)
    shard = os.path.join(src, "iter_0000006", "__0_0.distcp")
    with open(shard, "r+b") as f:
        f.truncate(100)
    with pytest.raises(CheckpointError, match="truncated"):
        convert.export_hf(src, out)
    proc = tool("convert_checkpoint.py", "reshard", "--input", src, "--output", out,
                "--pipeline-model-parallel-size", "2", check=False)
    assert proc.returncode == 2 and "truncated" in proc.stderr
    assert not os.path.exists(out) and not os.path.exists(out + ".partial")


def test_checkpoint_loading_never_unpickles_code(tmp_path, llama_run):
    """DCP's metadata is a pickle that torch reads with pickle.load: verify() unpickles
    it first resolving only torch's checkpoint classes. Non-tensor items are read with
    torch.load(weights_only=True). A checkpoint re-sealed around a malicious pickle
    (checksums matching) is refused before torch touches it."""
    import io

    import torch
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    from megatron_asyncmesh.checkpoint import integrity as ckpt

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    bad = str(tmp_path / "bad")
    shutil.copytree(os.path.join(llama_run["pp4"], "iter_0000006"), bad)
    with open(os.path.join(bad, ".metadata"), "wb") as f:
        pickle.dump({"x": Evil()}, f)
    meta_path = os.path.join(bad, ckpt.META)
    meta = json.load(open(meta_path))
    meta["files"][".metadata"] = {"bytes": os.path.getsize(os.path.join(bad, ".metadata")),
                                  "sha256": ckpt._sha256(os.path.join(bad, ".metadata"))}
    json.dump(meta, open(meta_path, "w"))
    with pytest.raises(ckpt.CheckpointError, match="posix.system|os.system"):
        ckpt.verify(bad)
    ckpt.verify(os.path.join(llama_run["pp4"], "iter_0000006"))   # the real one passes

    ckpt.weights_only_bytes()
    planner = DefaultLoadPlanner()
    planner.flatten_state_dict = False
    planner.state_dict = {}

    class Item:
        class dest_index:
            fqn = "x"

    payload = io.BytesIO()
    torch.save({"iteration": 3, "groups": [{"lr": 0.1}]}, payload)
    payload.seek(0)
    planner.load_bytes(Item, payload)
    assert planner.state_dict["x"] == {"iteration": 3, "groups": [{"lr": 0.1}]}
    evil = io.BytesIO()
    torch.save(Evil(), evil)
    evil.seek(0)
    with pytest.raises(pickle.UnpicklingError):
        planner.load_bytes(Item, evil)


MAKE_TE = r"""
import json, os, sys
import megatron_asyncmesh
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace
from megatron.core.dist_checkpointing.mapping import ShardedBase
from megatron_asyncmesh.checkpoint import convert, hf
from megatron_asyncmesh.checkpoint.integrity import META, write_meta

src, out = sys.argv[1], sys.argv[2]
directory, meta, cfg = convert.read_checkpoint(src)
padded = meta["layout"]["padded_vocab_size"]
it = os.path.join(out, "iter_0000006")
with convert.single_process(cfg) as cfg1:
    model = convert.build_model(cfg1, padded)
    convert.load_model(directory, meta, model)
    sharded = model.sharded_state_dict()

    def te(value):
        if isinstance(value, ShardedBase):
            value.key = hf.local_to_te_name(value.key)
        return value

    dict_list_map_inplace(te, sharded)
    os.makedirs(it)
    dist_checkpointing.save(sharded, it)
    write_meta(it, cfg1, padded, 6, contents="model")
with open(os.path.join(out, "latest_checkpointed_iteration.txt"), "w") as f:
    f.write("6")
with open(os.path.join(it, META)) as f:
    m = json.load(f)
m["layout"]["transformer_impl"] = "transformer_engine"      # what a TE run seals
with open(os.path.join(it, META), "w") as f:
    json.dump(m, f)
print("ok")
"""


def test_transformer_engine_names_convert_and_are_sealed(tmp_path, llama_run):
    """A checkpoint whose norms carry Transformer Engine's names (the norms fused into
    the next linear layer: ``linear_qkv.layer_norm_weight``, ``linear_fc1.layer_norm_
    weight``) and whose seal says so exports to the same Hugging Face model as the
    local-spec original; a run building the other layer spec is refused with the
    reason before anything is read."""
    from safetensors.torch import load_file

    from megatron_asyncmesh.checkpoint import convert
    from megatron_asyncmesh.checkpoint.hf import local_to_te_name, te_to_local_name
    from megatron_asyncmesh.checkpoint.integrity import CheckpointError, verify

    name = "decoder.layers.input_layernorm.weight"
    te_name = "decoder.layers.self_attention.linear_qkv.layer_norm_weight"
    assert local_to_te_name(name) == te_name
    assert te_to_local_name(local_to_te_name(name)) == name
    assert local_to_te_name("decoder.final_layernorm.weight") == \
        "decoder.final_layernorm.weight"
    te = str(tmp_path / "te")
    proc = subprocess.run(python_cmd("-c", MAKE_TE, llama_run["pp2"], te),
                          capture_output=True, text=True, env=env_for_ranks(), cwd=REPO,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    hf_te, hf_local = str(tmp_path / "hf_te"), str(tmp_path / "hf_local")
    tool("convert_checkpoint.py", "hf-export", "--input", te, "--output", hf_te)
    tool("convert_checkpoint.py", "hf-export", "--input", llama_run["pp2"], "--output",
         hf_local)
    a = load_file(os.path.join(hf_te, "model.safetensors"))
    b = load_file(os.path.join(hf_local, "model.safetensors"))
    assert sorted(a) == sorted(b) and all(a[k].equal(b[k]) for k in a)
    assert any("layernorm" in k for k in a)
    directory, meta, cfg = convert.read_checkpoint(te)
    with pytest.raises(CheckpointError, match="--transformer-impl transformer_engine"):
        verify(directory, cfg, meta["layout"]["padded_vocab_size"], 1)
