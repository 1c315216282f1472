"""Who forms a replica: the process groups of ``--dp-ranks-per-replica R``.

Under ``--dp-averaging sparse`` the data-parallel ranks of a stage are cut into
replicas of ``R`` consecutive data-parallel ranks (default 1: every rank its own
replica). Each rank then belongs to

- its **replica group**: the R ranks of its stage (and tensor rank) in its replica.
  Inside it everything is Megatron's ordinary data parallelism: the gradient
  all-reduce of ``DistributedDataParallel``, ``--use-distributed-optimizer`` (ZeRO-1)
  or the layer-wise optimizer sharding over it. These ranks sit on one node's fast
  interconnect.
- its **averaging group**: the ranks of the other replicas that hold the same
  parameters (same stage, tensor rank and position inside the replica). Only the
  sparse averaging crosses it, and only there do slow links sit.

Sparse runs place ranks replica-major (Megatron's ``tp-pp-dp`` order, see
``distributed.rank_order``): the ranks of one replica, all its pipeline stages included, are
consecutive, so a launcher that fills node after node puts a replica on a node and
only the averaging leaves it. Synchronous runs keep Megatron's default order.

Everything here is derived from Megatron's own parallel state after
``initialize_model_parallel``: one ``all_gather_object`` of each rank's coordinates at
start-up, then ``new_subgroups_by_enumeration`` (every rank takes part in creating
every group, as torch requires).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch.distributed as dist

from megatron_asyncmesh.dataparallel.config import check_ranks_per_replica
from megatron_asyncmesh.distributed import on_shutdown


@dataclass
class ReplicaLayout:
    ranks_per_replica: int
    replicas: int
    replica: int                 # this rank's replica
    replica_rank: int            # this rank's position inside its replica
    replica_group: object        # the replica's R ranks of this stage (gradient all-reduce)
    averaging_group: object      # the replicas' ranks holding the same parameters
    whole_replica_group: object  # every rank of this replica, all stages (its grad norm)
    stage_replica_group: object  # the replica's ranks of this stage, every tensor rank
    table: List[dict] = field(default_factory=list)   # every rank's coordinates

    def table_ranks(self, group: str) -> List[int]:
        """The ranks of this rank's ``group`` ("replica_group", "averaging", "pipeline",
        "tensor"), from the start-up table."""
        return next(r[group] for r in self.table if r["rank"] == dist.get_rank())

    def describe(self) -> str:
        """The process-group layout, printed at start-up by rank 0."""
        rows = sorted(self.table, key=lambda r: r["rank"])
        by_replica: Dict[int, List[dict]] = {}
        for r in rows:
            by_replica.setdefault(r["replica"], []).append(r)
        lines = [f"process groups: {len(rows)} ranks = PP {max(r['pp'] for r in rows) + 1} "
                 f"x TP {max(r['tp'] for r in rows) + 1} x DP {max(r['dp'] for r in rows) + 1}"
                 f"; {self.replicas} replicas of {self.ranks_per_replica} data-parallel "
                 f"rank(s) per stage"]
        for rep, members in sorted(by_replica.items()):
            hosts = sorted({m["host"] for m in members})
            lines.append(f"  replica {rep} (host {', '.join(hosts)}): ranks "
                         f"{[m['rank'] for m in members]}")
        for key, name in (("pipeline", "pipeline"), ("tensor", "tensor"),
                          ("replica_group", "gradient all-reduce (inside a replica)"),
                          ("averaging", "sparse averaging (across replicas)")):
            groups = sorted({tuple(r[key]) for r in rows})
            lines.append(f"  {name} groups: {[list(g) for g in groups]}")
        return "\n".join(lines)


_cache: Dict[tuple, ReplicaLayout] = {}


def _enumerate(rows: List[dict], key) -> List[List[int]]:
    """Ranks grouped by ``key(row)``, each group in data-parallel order."""
    groups: Dict[tuple, List[dict]] = {}
    for r in rows:
        groups.setdefault(key(r), []).append(r)
    return [[r["rank"] for r in sorted(g, key=lambda r: (r["dp"], r["pp"], r["tp"]))]
            for _, g in sorted(groups.items())]


def replica_layout(ranks_per_replica: int = 1) -> ReplicaLayout:
    """This rank's replica and its groups (collective; built once per process and
    layout: every rank sees the same sizes, so all agree whether to build)."""
    import socket

    from megatron.core import parallel_state as ps

    key = (ranks_per_replica, ps.get_pipeline_model_parallel_world_size(),
           ps.get_tensor_model_parallel_world_size(), ps.get_data_parallel_world_size())
    if key in _cache:
        return _cache[key]

    dp = ps.get_data_parallel_world_size()
    replicas = check_ranks_per_replica(ranks_per_replica, dp, True)
    r = ranks_per_replica
    mine = {"rank": dist.get_rank(), "pp": ps.get_pipeline_model_parallel_rank(),
            "tp": ps.get_tensor_model_parallel_rank(), "dp": ps.get_data_parallel_rank(),
            "host": socket.gethostname(),
            "pipeline": dist.get_process_group_ranks(ps.get_pipeline_model_parallel_group()),
            "tensor": dist.get_process_group_ranks(ps.get_tensor_model_parallel_group())}
    mine.update(replica=mine["dp"] // r, replica_rank=mine["dp"] % r)
    rows: List[Optional[dict]] = [None] * dist.get_world_size()
    dist.all_gather_object(rows, mine)
    inner = _enumerate(rows, lambda x: (x["pp"], x["tp"], x["replica"]))
    across = _enumerate(rows, lambda x: (x["pp"], x["tp"], x["replica_rank"]))
    whole = _enumerate(rows, lambda x: (x["replica"],))
    stage = _enumerate(rows, lambda x: (x["pp"], x["replica"]))
    for row in rows:
        row["replica_group"] = next(g for g in inner if row["rank"] in g)
        row["averaging"] = next(g for g in across if row["rank"] in g)
    replica_group, _ = dist.new_subgroups_by_enumeration(inner)
    averaging_group, _ = dist.new_subgroups_by_enumeration(across)
    whole_group, _ = dist.new_subgroups_by_enumeration(whole)
    stage_group, _ = dist.new_subgroups_by_enumeration(stage)
    layout = ReplicaLayout(r, replicas, mine["replica"], mine["replica_rank"], replica_group,
                           averaging_group, whole_group, stage_group, rows)
    _cache[key] = layout
    return layout


on_shutdown(_cache.clear)
