"""Checkpoint conversion: pipeline resharding, Hugging Face export / import, ZeRO.

Command line: ``tools/convert_checkpoint.py``. What is layout-independent and
what is not:

* Megatron-core's ``torch_dist`` checkpoints key every model tensor by its
  global name (layers carry their global index), and the optimizer's
  per-parameter state (Adam / NAdam moments, Muon momentum, error-feedback
  buffers) by the parameter's key. Both load at any pipeline size.
* The no-flush pipeline's older weight versions are keyed by parameter too,
  but *which* versions a stage holds depends on its position (``stash``:
  (P-1-k)/M steps back). They reshard when the new layout needs versions the
  checkpoint has (``2bw``: one version back on every stage); otherwise the
  converter says so and ``--drop-async-state`` writes a ``flush`` checkpoint
  (weights, optimizer, LR schedule, iteration; resume it with
  ``--pipeline-schedule flush``).
* Sparse data-parallel averaging state belongs to each (stage, replica):
  export picks one replica (``--replica``); resharding is refused.

Every output is written into ``<output>.partial`` and renamed when complete:
a failed conversion leaves nothing that looks finished.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from contextlib import contextmanager
from typing import Optional, Tuple

import torch

from megatron_asyncmesh import distributed as mdist
from megatron_asyncmesh.checkpoint import hf
from megatron_asyncmesh.checkpoint import state as ckpt
from megatron_asyncmesh.checkpoint.deepspeed import DS_CONFIG
from megatron_asyncmesh.checkpoint.hf import PROJECT_CONFIG
from megatron_asyncmesh.checkpoint.integrity import (
    LATEST, META, CheckpointError, latest_iteration_dir, saved_transformer_impl, verify)
from megatron_asyncmesh.config import TrainConfig, config_from_dict
from megatron_asyncmesh.model import build_gpt_stage
from megatron_asyncmesh.options import ConfigError
from megatron_asyncmesh.pipeline.executor import AsyncPipelineSchedule
from megatron_asyncmesh.stage import build_stage

HF_TOKENIZER = "tokenizer.model"


# --------------------------------------------------------------------------- paths
def iteration_dir(path: str) -> str:
    """A checkpoint root (with ``latest_checkpointed_iteration.txt``) or one
    ``iter_XXXXXXX`` directory -> the iteration directory."""
    if os.path.isfile(os.path.join(path, META)):
        return path
    latest = latest_iteration_dir(path)
    if latest is not None:
        return latest
    if os.path.isdir(path) and os.path.basename(path.rstrip("/")).startswith("iter_"):
        verify(path)                      # raises the precise reason (no metadata)
    raise CheckpointError(
        f"{path!r} is not a megatron-asyncmesh checkpoint: neither {META} nor {LATEST} "
        f"is there (pass the --save directory or one of its iter_XXXXXXX directories).")


def read_checkpoint(path: str) -> Tuple[str, dict, TrainConfig]:
    """Verified (checksums, format version) iteration dir, its metadata and config."""
    directory = iteration_dir(path)
    meta = verify(directory)
    if "config" not in meta:
        raise CheckpointError(f"{directory}: the metadata holds no model config (written by "
                              f"an older megatron-asyncmesh); re-save it with this version.")
    return directory, meta, config_from_dict(meta["config"])


@contextmanager
def output_dir(path: str, overwrite: bool = False):
    """Write into ``path.partial``; rename to ``path`` only when the body succeeded."""
    if os.path.exists(path) and not overwrite:
        raise ConfigError(f"output {path!r} exists; choose another path or pass --overwrite.")
    partial = path.rstrip("/") + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if os.path.exists(path):
        shutil.rmtree(path)
    os.replace(partial, path)


# --------------------------------------------------------------------------- one process
@contextmanager
def single_process(cfg: TrainConfig):
    """A one-rank gloo world and Megatron parallel state for a PP = 1 model."""
    import torch.distributed as dist
    from megatron.core import parallel_state


    cfg = dataclasses.replace(cfg, pipeline_model_parallel_size=1, data_parallel_size=None,
                              decoder_first_pipeline_num_layers=None,
                              decoder_last_pipeline_num_layers=None,
                              use_distributed_optimizer=False, dp_ranks_per_replica=1,
                              tensor_model_parallel_size=1)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(var, None)
    mdist.init_distributed()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1,
                                             pipeline_model_parallel_size=1)
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    torch.manual_seed(cfg.seed)
    model_parallel_cuda_manual_seed(cfg.seed)
    try:
        yield cfg
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def build_model(cfg: TrainConfig, padded_vocab: int):
    """The unsplit GPTModel (call inside :func:`single_process`), eval mode."""

    # Conversion and evaluation compute in fp32: a --bf16 checkpoint's weights load into
    # fp32 tensors (exactly: every bf16 value is an fp32 value).
    model = build_gpt_stage(dataclasses.replace(cfg, bf16=False), padded_vocab)
    return model.eval()


def load_model(directory: str, meta: dict, model, replica: Optional[int] = None) -> None:
    """Model weights of a project checkpoint (any pipeline size) into ``model``."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace
    from megatron.core.dist_checkpointing.mapping import ShardedBase

    layout = meta["layout"]
    sharded = model.sharded_state_dict()
    if saved_transformer_impl(meta) == "transformer_engine":
        # The model here is built with the local spec: read the norms from where
        # Transformer Engine keeps them.
        def te_key(value):
            if isinstance(value, ShardedBase):
                value.key = hf.local_to_te_name(value.key)
            return value

        dict_list_map_inplace(te_key, sharded)
    if layout.get("dp_averaging") == "sparse" and meta.get("contents", "full") == "full":
        replicas = layout.get("data_parallel_size", 1) // layout.get("dp_ranks_per_replica", 1)
        if replica == "mean":
            _load_replica_mean(directory, meta, model, replicas)
            return
        if replica is None or not 0 <= replica < replicas:
            raise ConfigError(
                f"{directory} holds {replicas} independent replicas (--dp-averaging sparse): "
                f"choose one with --replica 0..{replicas - 1}, or --replica mean for their "
                f"mean (runs with --dp-final-average end with one model: any replica).")

        def own(value):
            if isinstance(value, ShardedBase):
                value.key = f"replica{replica}.{value.key}"
            return value

        dict_list_map_inplace(own, sharded)
    state = dist_checkpointing.load({"model": sharded}, directory)
    model.load_state_dict(state["model"])


def _load_replica_mean(directory: str, meta: dict, model, replicas: int) -> None:
    """The mean of a sparse checkpoint's replicas, in fp32, into ``model``."""
    total = None
    for r in range(replicas):
        load_model(directory, meta, model, r)
        state = model_state(model)
        if total is None:
            total = state
        else:
            for k, v in state.items():
                total[k] += v
    with torch.no_grad():
        for k, v in model.state_dict().items():
            if k in total:
                v.copy_(total[k] / replicas)


def model_state(model) -> dict:
    """Plain fp32 tensors by Megatron name (no ``_extra_state``)."""
    return {k: v.detach().float().clone() for k, v in model.state_dict().items()
            if not k.endswith("_extra_state") and v is not None}


# --------------------------------------------------------------------------- Hugging Face
def write_hf(output: str, cfg: TrainConfig, state: dict, padded_vocab: int,
             tokenizer_model: Optional[str]) -> str:
    """config.json + model.safetensors (+ the SentencePiece tokenizer) into ``output``."""
    from safetensors.torch import save_file


    kind, tensors = hf.to_hf(state, cfg)
    with open(os.path.join(output, "config.json"), "w") as f:
        json.dump(hf.hf_config(cfg, padded_vocab, kind), f, indent=1)
    save_file(tensors, os.path.join(output, "model.safetensors"), metadata={"format": "pt"})

    with open(os.path.join(output, PROJECT_CONFIG), "w") as f:   # evaluation defaults
        json.dump({"config": cfg.to_dict(), "padded_vocab_size": padded_vocab}, f, indent=1)
    if tokenizer_model:
        write_hf_tokenizer(tokenizer_model, output, cfg.resolved_max_position_embeddings())
    return kind


def write_hf_tokenizer(tokenizer_model: str, output: str, max_length: int) -> None:
    """The project's SentencePiece model for ``AutoTokenizer`` (LlamaTokenizer), giving
    the same ids as SentencePiece itself. One edit to the model proto: user-defined
    pieces containing a space ("    ") can never be emitted by SentencePiece (its
    normaliser turns spaces into U+2581 before matching) but transformers would match
    them as added tokens; they are marked UNUSED (ids unchanged). Checked here."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    with open(tokenizer_model, "rb") as f:
        original = f.read()
    proto = pb.ModelProto()
    proto.ParseFromString(original)
    for piece in proto.pieces:
        if piece.type == pb.ModelProto.SentencePiece.USER_DEFINED and " " in piece.piece:
            piece.type = pb.ModelProto.SentencePiece.UNUSED
    edited = proto.SerializeToString()
    probe = "def f(x):\n    return  x\n\t\t\u00fc \U0001F600\n        pass  \n"
    before = spm.SentencePieceProcessor(model_proto=original).encode(probe)
    if spm.SentencePieceProcessor(model_proto=edited).encode(probe) != before:
        raise CheckpointError(f"{tokenizer_model}: the Hugging Face tokenizer edit changed "
                              f"SentencePiece's ids; export it without the tokenizer.")
    with open(os.path.join(output, HF_TOKENIZER), "wb") as f:
        f.write(edited)
    with open(os.path.join(output, "tokenizer_config.json"), "w") as f:
        # The data were tokenized without BOS / EOS insertion; the dummy prefix (a
        # leading U+2581) is SentencePiece's own setting.
        json.dump({"tokenizer_class": "LlamaTokenizer", "add_bos_token": False,
                   "add_eos_token": False, "legacy": False,
                   "add_prefix_space": bool(proto.normalizer_spec.add_dummy_prefix),
                   "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                   "pad_token": "<pad>", "clean_up_tokenization_spaces": False,
                   "model_max_length": max_length}, f, indent=1)


def export_hf(checkpoint: str, output: str, replica: Optional[int] = None,
              overwrite: bool = False, log=print) -> dict:
    directory, meta, cfg = read_checkpoint(checkpoint)

    hf.family(cfg)                                  # refuse before any work
    padded = meta["layout"]["padded_vocab_size"]
    tokenizer = cfg.tokenizer_model if cfg.tokenizer_model and \
        os.path.isfile(cfg.tokenizer_model) else None
    with output_dir(output, overwrite) as out, single_process(cfg) as cfg1:
        model = build_model(cfg1, padded)
        load_model(directory, meta, model, replica)
        kind = write_hf(out, cfg1, model_state(model), padded, tokenizer)
    log(f"exported {directory} (iteration {meta['iteration']}) as a {kind} model to {output}"
        + ("" if tokenizer else " (tokenizer not found: config.json and weights only)"))
    return {"family": kind, "iteration": meta["iteration"], "tokenizer": bool(tokenizer)}


def read_hf(path: str) -> Tuple[dict, dict]:
    """config.json and all safetensors / pytorch_model.bin tensors of a HF directory."""
    from safetensors.torch import load_file

    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise ConfigError(f"{path!r}: no config.json, not a Hugging Face model directory.")
    with open(config_path) as f:
        config = json.load(f)
    tensors = {}
    files = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
    for name in files:
        tensors.update(load_file(os.path.join(path, name)))
    if not files:
        bins = sorted(n for n in os.listdir(path) if n.endswith(".bin"))
        if not bins:
            raise ConfigError(f"{path!r}: no *.safetensors or *.bin weights.")
        for name in bins:   # weights_only: never unpickles arbitrary objects
            tensors.update(torch.load(os.path.join(path, name), map_location="cpu",
                                      weights_only=True))
    return config, tensors


def import_hf(path: str, output: str, base: Optional[TrainConfig] = None,
              overwrite: bool = False, log=print) -> dict:
    """A Hugging Face GPT-2 / Llama directory -> a project checkpoint (weights only,
    iteration 0) that ``--load`` continues from with a fresh optimizer, at any
    pipeline size. ``base``: training flags to record with it (model flags are the
    Hugging Face config's)."""
    from megatron.core import dist_checkpointing


    config, tensors = read_hf(path)
    overrides = hf.config_overrides(config)
    if config.get("model_type") == "gpt2" and config.get("activation_function") != "gelu":
        log(f"note: {path} uses the tanh-approximated GELU "
            f"({config.get('activation_function')}); Megatron's MLP uses the exact GELU "
            f"(activations differ by at most ~5e-4).")
    cfg = dataclasses.replace(base or TrainConfig(), **overrides)
    cfg.seq_length = min(cfg.seq_length, cfg.resolved_max_position_embeddings())
    vocab = config["vocab_size"]
    if vocab % cfg.make_vocab_size_divisible_by:
        cfg.make_vocab_size_divisible_by = 1       # keep the rows as they are
    tokenizer = os.path.join(path, HF_TOKENIZER)
    cfg.tokenizer_model = tokenizer if os.path.isfile(tokenizer) else cfg.tokenizer_model
    state = hf.from_hf(tensors, cfg)
    with output_dir(output, overwrite) as out, single_process(cfg) as cfg1:
        model = build_model(cfg1, vocab)
        own = model_state(model)
        missing = sorted(set(own) - set(state))
        extra = sorted(set(state) - set(own))
        if missing or extra:
            raise ConfigError(f"{path}: tensors do not match the model: missing {missing[:5]}, "
                              f"unexpected {extra[:5]}.")
        for name, value in state.items():
            if own[name].shape != value.shape:
                raise ConfigError(f"{path}: {name} has shape {tuple(value.shape)}, the model "
                                  f"expects {tuple(own[name].shape)}.")
        model.load_state_dict(state, strict=False)
        iteration_path = os.path.join(out, "iter_0000000")
        os.makedirs(iteration_path)
        dist_checkpointing.save({"model": model.sharded_state_dict(), "iteration": 0},
                                iteration_path)
        cfg1.tokenizer_model = cfg.tokenizer_model
        ckpt.write_meta(iteration_path, cfg1, vocab, 0, contents="model")
        with open(os.path.join(out, LATEST), "w") as f:
            f.write("0")
    log(f"imported {path} ({config.get('model_type')}) into {output}: load it with --load "
        f"and the model flags {overrides}")
    return {"family": config.get("model_type"), "overrides": overrides}


# --------------------------------------------------------------------------- ZeRO
def export_zero(checkpoint: str, output: str, overwrite: bool = False, log=print) -> dict:
    """A DeepSpeed ZeRO (stage 0-3) checkpoint of ``train_deepspeed --save`` -> HF, via
    DeepSpeed's own consolidation (``zero_to_fp32``) for stages 1-3."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    config_path = os.path.join(checkpoint, DS_CONFIG)
    if not os.path.isfile(config_path):
        raise ConfigError(f"{checkpoint!r}: no {DS_CONFIG}; pass the --save directory of "
                          f"a train_deepspeed run.")
    with open(config_path) as f:
        saved = json.load(f)
    cfg = config_from_dict(saved["config"])

    hf.family(cfg)
    padded = saved["padded_vocab_size"]
    if saved.get("zero_stage") == 0:
        # No ZeRO partitions to merge (zero_to_fp32 handles stages 1-3): the engine saved
        # the whole fp32 module; read weights-only.
        with open(os.path.join(checkpoint, "latest")) as f:
            tag = f.read().strip()
        states = os.path.join(checkpoint, tag, "mp_rank_00_model_states.pt")
        state = torch.load(states, map_location="cpu", weights_only=True)["module"]
    else:
        state = get_fp32_state_dict_from_zero_checkpoint(checkpoint)
    tokenizer = cfg.tokenizer_model if cfg.tokenizer_model and \
        os.path.isfile(cfg.tokenizer_model) else None
    with output_dir(output, overwrite) as out, single_process(cfg) as cfg1:
        model = build_model(cfg1, padded)
        own = model_state(model)
        missing = sorted(set(own) - set(state))
        if missing:
            raise ConfigError(f"{checkpoint}: the consolidated ZeRO state lacks {missing[:5]}.")
        model.load_state_dict({k: state[k] for k in own}, strict=False)
        kind = write_hf(out, cfg1, model_state(model), padded, tokenizer)
    log(f"exported the ZeRO checkpoint {checkpoint} as a {kind} model to {output}")
    return {"family": kind}


# --------------------------------------------------------------------------- reshard
def reshard(checkpoint: str, output: str, pipeline_size: Optional[int] = None,
            drop_async_state: bool = False, overwrite: bool = False, log=print,
            tensor_size: Optional[int] = None) -> dict:
    """(P, T) -> (P', T') through a P' x T'-rank gloo job (``torchrun``): each new stage
    and tensor shard loads its part of every layout-independent tensor (Megatron's
    sharded tensors carry their global shape and offsets) and the checkpoint is saved
    at P', T'. None keeps the saved size."""
    import subprocess


    directory, meta, cfg = read_checkpoint(checkpoint)
    layout = meta["layout"]
    if pipeline_size is None:
        pipeline_size = layout["pipeline_model_parallel_size"]
    if tensor_size is None:
        tensor_size = layout.get("tensor_model_parallel_size", 1)
    if cfg.num_attention_heads % tensor_size:
        raise ConfigError(f"--tensor-model-parallel-size {tensor_size} does not divide the "
                          f"model's {cfg.num_attention_heads} attention heads.")
    if layout.get("dp_averaging") == "sparse" and meta.get("contents", "full") == "full":
        raise ConfigError(
            f"{directory} holds independent replicas (--dp-averaging sparse) whose averaging "
            f"state belongs to each stage's tensors: it cannot be resharded. Export one "
            f"replica (convert_checkpoint.py hf-export --replica R) and import it instead.")
    if cfg.num_layers % pipeline_size and pipeline_size > 1:
        raise ConfigError(f"--pipeline-model-parallel-size {pipeline_size} does not divide "
                          f"the model's {cfg.num_layers} layers.")
    with output_dir(output, overwrite) as out:
        job = {"input": directory, "output": out, "pipeline_size": pipeline_size,
               "tensor_size": tensor_size, "drop_async_state": drop_async_state}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
               str(pipeline_size * tensor_size), "--master_addr", "127.0.0.1", "--master_port",
               str(mdist.free_port()), "-m", "megatron_asyncmesh.checkpoint.convert",
               json.dumps(job)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            lines = (proc.stdout + proc.stderr).splitlines()
            # The workers' own refusal (see __main__ below), else the last lines.
            reason = [ln.split("Error: ", 1)[1] for ln in lines
                      if ln.startswith(("CheckpointError: ", "ConfigError: "))]
            raise CheckpointError("resharding failed: " + (reason[0] if reason else
                                                          "\n".join(lines[-20:])))
    was = (layout["pipeline_model_parallel_size"], layout.get("tensor_model_parallel_size", 1))
    log(f"resharded {directory} (P = {was[0]}, T = {was[1]}) to P = {pipeline_size}, "
        f"T = {tensor_size}: {output}")
    return {"from": was[0], "to": pipeline_size, "tensor_from": was[1],
            "tensor_to": tensor_size}


def _reshard_worker(job: dict) -> None:
    """One rank of the P'-rank job that :func:`reshard` launches."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.api import CheckpointException


    directory, meta, saved = read_checkpoint(job["input"])
    root = os.path.dirname(directory)
    cfg = dataclasses.replace(
        saved, pipeline_model_parallel_size=job["pipeline_size"], data_parallel_size=1,
        decoder_first_pipeline_num_layers=None, decoder_last_pipeline_num_layers=None,
        tensor_model_parallel_size=job.get("tensor_size", 1),
        use_distributed_optimizer=False, dp_averaging="none", dp_ranks_per_replica=1,
        load=root, save=job["output"], save_keep_last=0)
    if job["drop_async_state"]:
        cfg.pipeline_schedule = "flush"
    mdist.init_distributed()
    torch.set_num_threads(1)
    mdist.init_model_parallel(cfg)
    num_microbatches = cfg.num_microbatches(1)
    model, optimizer, _, scheduler, _ = build_stage(
        cfg, meta["layout"]["padded_vocab_size"], num_microbatches)
    try:
        iteration, held = ckpt.load(cfg, model, optimizer, scheduler, num_microbatches,
                                    reshard=True, iteration_path=directory)
    except CheckpointError:
        raise
    except (Exception, CheckpointException) as exc:    # DCP's is a BaseException
        raise CheckpointError(
            f"{directory} cannot be loaded at P = {cfg.pipeline_model_parallel_size}, T = "
            f"{cfg.tensor_model_parallel_size} ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:300]}). With --pipeline-schedule "
            f"{saved.pipeline_schedule} the new stages need weight versions the checkpoint "
            f"does not hold (they are kept per stage and per tensor shard); pass "
            f"--drop-async-state to keep weights, optimizer and schedule (a flush "
            f"checkpoint).") from None
    schedule = None
    if cfg.pipeline_schedule != "flush":
        schedule = AsyncPipelineSchedule(cfg.pipeline_schedule, start_step=iteration)
        schedule.restore_versions(held)
    ckpt.save(cfg, model, optimizer, scheduler, iteration, schedule)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    import megatron_asyncmesh  # noqa: F401  (CPU compatibility layer before Megatron)

    try:
        _reshard_worker(json.loads(sys.argv[1]))
    except (ConfigError, CheckpointError) as exc:
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)
