"""Checkpoint integrity: the sealed metadata (format version, model shape and layout,
size and SHA-256 of every file) and its verification before anything is read, the
weights-only loading of DCP items, and the model-shape check shared by every checkpoint
kind.

A checkpoint directory is complete when ``asyncmesh_meta.json`` (written last, atomically)
is there; ``verify`` checks the metadata, every checksum, the pickled DCP metadata and,
given a config, the model shape and layout.
"""

from __future__ import annotations

import json
import os
from typing import Optional

from megatron_asyncmesh import patching
from megatron_asyncmesh.model import resolve_transformer_impl
from megatron_asyncmesh.options import ConfigError

WEIGHTS_ONLY_PATCH = patching.declare(
    "dcp-weights-only", package="torch",
    target="`torch.distributed.checkpoint.default_planner.DefaultLoadPlanner.load_bytes`",
    replacement="the same placement of the loaded object, read with "
                "`torch.load(weights_only=True)`",
    why="torch 2.13 reads a checkpoint's non-tensor items (iteration, scheduler state, param "
        "groups; Megatron's `MCoreLoadPlanner` and `load_common_state_dict` inherit it) with "
        "`weights_only=False`, which would run any pickled callable",
    when="from the first `verify()` (before any load) to the end of the process")

LATEST = "latest_checkpointed_iteration.txt"
META = "asyncmesh_meta.json"          # written last: its presence marks a complete checkpoint
FORMAT_VERSION = 1
# What a checkpoint's tensors are shaped and laid out by; loading into another value fails.
SHAPE_FIELDS = ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size",
                "untie_embeddings_and_output_weights", "position_embedding_type",
                "normalization", "swiglu")
LAYOUT_FIELDS = ("pipeline_model_parallel_size", "tensor_model_parallel_size",
                 "pipeline_schedule", "dp_averaging", "data_parallel_size")


def iter_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def latest_iteration_dir(root: str) -> Optional[str]:
    """The iteration directory ``root``'s latest-iteration file points at (None when
    there is no such file: nothing complete was saved there)."""
    latest = os.path.join(root, LATEST)
    if not os.path.isfile(latest):
        return None
    with open(latest) as f:
        return iter_dir(root, int(f.read().strip()))


class CheckpointError(ConfigError):
    """A checkpoint that cannot be loaded as asked; the message says why and what to do."""


def checksums_enabled() -> bool:
    """``ASYNCMESH_CHECKSUMS=0`` turns hashing off (sizes are still checked): only for
    ``tools/bench_checkpoint.py``, which measures what the checksums cost."""
    return os.environ.get("ASYNCMESH_CHECKSUMS", "1") != "0"


def _sha256(path: str) -> Optional[str]:
    if not checksums_enabled():
        return None
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def model_shape(cfg, vocab_size: int) -> dict:
    """What fixes every tensor's shape: SHAPE_FIELDS (FFN size resolved) and the
    padded vocabulary."""
    out = {f: getattr(cfg, f) for f in SHAPE_FIELDS}
    out["ffn_hidden_size"] = cfg.resolved_ffn_hidden_size()
    out["padded_vocab_size"] = vocab_size
    return out


def check_same_model(where: str, saved: dict, cfg, vocab_size: int) -> None:
    """Raise CheckpointError naming every field where ``saved`` (a ``model_shape``)
    differs from this run's model."""
    mine = model_shape(cfg, vocab_size)
    diff = {f: (saved.get(f), v) for f, v in mine.items() if saved.get(f) != v}
    if diff:
        raise CheckpointError(
            f"{where} holds a different model: "
            + ", ".join(f"{k} saved {a!r} vs now {b!r}" for k, (a, b) in diff.items())
            + ". Use the same model flags (and tokenizer, for the vocabulary).")


def _layout(cfg, vocab_size: int, dp: int) -> dict:
    out = model_shape(cfg, vocab_size)
    out.update({f: getattr(cfg, f) for f in LAYOUT_FIELDS if f != "data_parallel_size"})
    out["data_parallel_size"] = dp
    out["dp_ranks_per_replica"] = cfg.dp_ranks_per_replica
    # The layer spec names the tensors (Transformer Engine fuses the norms into the
    # following linear layers): part of the seal. Checkpoints from before it was sealed
    # were all written with the local spec.
    out["transformer_impl"] = resolve_transformer_impl(cfg)
    return out


def saved_transformer_impl(meta: dict) -> str:
    return meta.get("layout", {}).get("transformer_impl", "local")


def data_parallel_size() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_data_parallel_world_size()


def _listing(directory: str) -> dict:
    """Every file under ``directory`` (relative path -> bytes), META excluded."""
    out = {}
    for root, _, names in os.walk(directory):
        for name in sorted(names):
            path = os.path.join(root, name)
            rel = os.path.relpath(path, directory)
            if rel not in (META, META + ".tmp"):
                out[rel] = os.path.getsize(path)
    return out


def _world(collective: bool = True) -> tuple:
    """(ranks, this rank) sharing the checksum work: the process group's, else (1, 0)."""
    import torch.distributed as dist

    if collective and dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def _my_share(sizes: dict, collective: bool = True) -> list:
    """The files this rank hashes: the ranks of the world split the bytes evenly (the
    largest file first to the least-loaded rank; every rank computes the same split),
    so checksumming a checkpoint takes the same time at any number of ranks."""
    world, rank = _world(collective)
    if world == 1:
        return sorted(sizes)
    load = [0] * world
    share = []
    for rel in sorted(sizes, key=lambda r: (-sizes[r], r)):
        owner = min(range(world), key=lambda k: (load[k], k))
        load[owner] += sizes[rel]
        if owner == rank:
            share.append(rel)
    return share


def _gather(mine, collective: bool = True):
    """Every rank's ``mine`` (a list of all of them), or ``[mine]`` alone."""
    import torch.distributed as dist

    world, _ = _world(collective)
    if world == 1:
        return [mine]
    out = [None] * world
    dist.all_gather_object(out, mine)
    return out


def checksum_files(directory: str, collective: bool = True) -> dict:
    """``{relative path: {bytes, sha256}}`` of every file under ``directory``; with
    ``collective`` and a process group, every rank calls it and hashes its share of the
    bytes."""
    sizes = _listing(directory)
    mine = {rel: _sha256(os.path.join(directory, rel))
            for rel in _my_share(sizes, collective)}
    digests = {}
    for part in _gather(mine, collective):
        digests.update(part)
    return {rel: {"bytes": sizes[rel], "sha256": digests[rel]} for rel in sorted(sizes)}


def write_meta(directory: str, cfg, vocab_size: int, iteration: int,
               contents: str = "full", files: Optional[dict] = None) -> None:
    """Checksums of every file (``files``, from :func:`checksum_files`, or computed
    here), the layout and the config, into ``META`` (atomically). ``contents``: "full"
    (a training state) or "model" (weights only, e.g. imported from Hugging Face: loads
    at any pipeline size with a fresh optimizer)."""
    if files is None:                       # one process writes: no collective
        files = checksum_files(directory, collective=False)
    meta = {"format_version": FORMAT_VERSION, "iteration": iteration,
            "layout": _layout(cfg, vocab_size, data_parallel_size()), "contents": contents,
            "config": cfg.to_dict(), "files": files}
    tmp = os.path.join(directory, META + ".tmp")
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(directory, META))


# What torch_dist's pickled DCP metadata (``.metadata``) may reference: torch's own
# checkpoint metadata classes, sizes, dtypes and layouts. Anything else is refused.
_SAFE_PICKLE_MODULES = ("torch.distributed.checkpoint.metadata",
                        "torch.distributed.checkpoint.planner",
                        "torch.distributed.checkpoint.filesystem")
_SAFE_PICKLE_NAMES = {("torch", "Size"), ("torch.serialization", "_get_layout"),
                      ("collections", "OrderedDict")}


def check_pickle(path: str) -> None:
    """Unpickle ``path`` resolving only the allowed globals (see above): a pickle that
    names any other callable (``os.system``, ``builtins.eval``, ...) is refused before
    torch's DCP reader (which uses plain ``pickle.load``) ever sees it."""
    import pickle

    import torch

    class Restricted(pickle.Unpickler):
        def find_class(self, module, name):
            if module in _SAFE_PICKLE_MODULES or (module, name) in _SAFE_PICKLE_NAMES or \
                    (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
                return super().find_class(module, name)
            raise CheckpointError(
                f"{path} references {module}.{name}: checkpoint metadata may only hold torch's "
                f"checkpoint classes; refusing to unpickle it (not a megatron-asyncmesh "
                f"checkpoint, or tampered with).")

    with open(path, "rb") as f:
        try:
            Restricted(f).load()
        except CheckpointError:
            raise
        except Exception as exc:
            raise CheckpointError(f"{path}: unreadable checkpoint metadata ({exc}).") from None


def weights_only_bytes() -> None:
    """torch's DCP load planner (``DefaultLoadPlanner``, which Megatron's
    ``MCoreLoadPlanner`` and ``load_common_state_dict`` use) reads a checkpoint's
    non-tensor items (iteration, schedule state, param groups) with
    ``torch.load(weights_only=False)``; make it ``weights_only=True`` (plain containers,
    numbers, strings, tensors). Tensors are read weights-only by torch already."""
    from torch.distributed.checkpoint._traverse import set_element
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    if getattr(DefaultLoadPlanner.load_bytes, "_asyncmesh_weights_only", False):
        return

    def load_bytes(self, read_item, value) -> None:   # DefaultLoadPlanner's, weights-only
        import torch

        loaded = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn],
                        loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded

    load_bytes._asyncmesh_weights_only = True
    patching.replace(DefaultLoadPlanner, "load_bytes", load_bytes, patch=WEIGHTS_ONLY_PATCH)


def check_param_groups(what: str, cfg, saved_cfg, iteration: int) -> None:
    """The resume of ``what`` (saved by a run configured as ``saved_cfg``, its config
    read back with ``config_from_dict``) keeps the optimizer's learning-rate groups:
    Megatron finds each state by its group's key (max / min lr among them) and would
    stop deep in its loader, torch's LambdaLR would bring back the saved lrs; refuse
    another --decoupled-lr / --decoupled-min-lr here, with the values that resume."""
    ours = (cfg.decoupled_lr, cfg.resolved_decoupled_min_lr())
    theirs = (saved_cfg.decoupled_lr, saved_cfg.resolved_decoupled_min_lr())
    if ours == theirs:
        return
    if theirs[0] is None:
        how = ("without --decoupled-lr (a YAML config that sets decoupled_lr, e.g. "
               "launch/configs/mesh.yaml since it does, needs that line removed)")
    elif saved_cfg.decoupled_min_lr is None:     # the default ratio, exactly as saved
        how = (f"with --decoupled-lr {theirs[0]!r} and the saved --lr / --min-lr, without "
               f"--decoupled-min-lr")
    else:
        how = f"with --decoupled-lr {theirs[0]!r} --decoupled-min-lr {theirs[1]!r}"
    raise ConfigError(
        f"{what}: iteration {iteration} was saved with the input embedding "
        f"and output layer at decoupled lr {_lr(theirs[0])} (min {_lr(theirs[1])}) and this "
        f"run sets {_lr(ours[0])} (min {_lr(ours[1])}): the optimizer state is stored per "
        f"learning-rate group, so the groups must match. Resume {how}.")


def _lr(value) -> str:
    return "none" if value is None else f"{value:g}"


def verify(directory: str, cfg=None,
           vocab_size: Optional[int] = None, dp: Optional[int] = None,
           reshard: bool = False) -> dict:
    """Check a checkpoint before reading a byte of it: complete, not newer than this
    code, files intact, and (given ``cfg``, the padded vocabulary and DP) the same model
    shape and layout (``reshard``: any pipeline size; the converter's loads). Raises
    CheckpointError; returns the metadata."""
    path = os.path.join(directory, META)
    if not os.path.isfile(path):
        raise CheckpointError(
            f"{directory}: no {META}, so the checkpoint is incomplete (a save was "
            f"interrupted) or was not written by megatron-asyncmesh; load an earlier one.")
    try:
        with open(path) as f:
            meta = json.load(f)
    except ValueError as exc:
        raise CheckpointError(f"{path}: unreadable metadata ({exc}).") from None
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{directory}: checkpoint format version {version!r} is newer than this "
            f"megatron-asyncmesh reads ({FORMAT_VERSION}); upgrade megatron-asyncmesh.")
    for rel, info in meta["files"].items():
        file = os.path.join(directory, rel)
        if not os.path.isfile(file):
            raise CheckpointError(f"{directory}: file {rel} is missing.")
        size = os.path.getsize(file)
        if size != info["bytes"]:
            raise CheckpointError(f"{directory}: file {rel} has {size} bytes, the metadata "
                                  f"says {info['bytes']} (truncated or overwritten).")
        if os.path.basename(rel) == ".metadata":
            check_pickle(file)
    # Checksums: each rank of a process group verifies its share of the bytes (every rank
    # calls verify before loading), and all raise the first mismatch any of them found.
    share = _my_share({rel: info["bytes"] for rel, info in meta["files"].items()})
    bad = [rel for rel in share if meta["files"][rel]["sha256"] is not None
           and checksums_enabled()
           and _sha256(os.path.join(directory, rel)) != meta["files"][rel]["sha256"]]
    bad = sorted(rel for part in _gather(bad) for rel in part)
    if bad:
        raise CheckpointError(f"{directory}: file {bad[0]} does not match its checksum "
                              f"(corrupted); load an earlier checkpoint.")
    weights_only_bytes()               # every load after this check reads weights-only
    if cfg is not None:
        saved, mine = meta["layout"], _layout(cfg, vocab_size, dp)
        check_same_model(directory, saved, cfg, vocab_size)
        impl = saved_transformer_impl(meta), mine["transformer_impl"]
        if impl[0] != impl[1]:
            raise CheckpointError(
                f"{directory} was written with --transformer-impl {impl[0]}, this run builds "
                f"the {impl[1]} layer spec, whose parameters have other names (Transformer "
                f"Engine fuses each norm into the next linear layer). Resume with "
                f"--transformer-impl {impl[0]}, or carry the weights over through "
                f"tools/convert_checkpoint.py hf-export then hf-import.")
        if meta.get("contents", "full") == "model":
            return meta                   # weights only: any layout, fresh optimizer
        tp = saved.get("tensor_model_parallel_size", 1), mine["tensor_model_parallel_size"]
        if tp[0] != tp[1] and not reshard:
            raise CheckpointError(
                f"{directory} was saved with --tensor-model-parallel-size {tp[0]}, this run "
                f"has {tp[1]}: its optimizer state and weight versions are split {tp[0]} "
                f"ways. Resume with --tensor-model-parallel-size {tp[0]}, or convert it: "
                f"python tools/convert_checkpoint.py reshard --input {directory} --output "
                f"NEW_DIR --tensor-model-parallel-size {tp[1]}, or evaluate / export it "
                f"as it is (tools/evaluate.py, convert_checkpoint.py hf-export read any TP).")
        pp = saved["pipeline_model_parallel_size"], mine["pipeline_model_parallel_size"]
        if pp[0] != pp[1] and not reshard:
            raise CheckpointError(
                f"{directory} was saved with --pipeline-model-parallel-size {pp[0]}, this "
                f"run has {pp[1]}: resume with {pp[0]} stages, or reshard it first: "
                f"python tools/convert_checkpoint.py reshard --input {directory} "
                f"--output NEW_DIR --pipeline-model-parallel-size {pp[1]}")
        dp = saved["data_parallel_size"], mine["data_parallel_size"]
        per = saved.get("dp_ranks_per_replica", 1), mine["dp_ranks_per_replica"]
        if mine["dp_averaging"] == "sparse" and saved["dp_averaging"] == "sparse" and \
                (dp[0] != dp[1] or per[0] != per[1]):
            raise CheckpointError(
                f"{directory} holds {dp[0] // per[0]} independent replicas of {per[0]} "
                f"data-parallel rank(s) per stage (--dp-averaging sparse, DP {dp[0]}, "
                f"--dp-ranks-per-replica {per[0]}); this run has DP {dp[1]} with "
                f"--dp-ranks-per-replica {per[1]}: resume with the same replicas (launch "
                f"{dp[0]} data-parallel ranks per stage with --dp-ranks-per-replica "
                f"{per[0]}), or export one model (convert_checkpoint.py hf-export --replica "
                f"mean) and start from it.")
    return meta

