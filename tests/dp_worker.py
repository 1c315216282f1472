"""Replica worker for tests/test_dataparallel.py (run under a launcher, gloo).

Each rank trains its own copy of a small torch model on its own data with
AdamW and calls a real :class:`SparseAverager` on ``deepspeed.comm`` after
every step. Rank 0 writes every rank's final parameters and byte counts, plus
what deepspeed's comms logger recorded, to ``--out``. The test replays the
same replicas in one process (tests/test_dataparallel.py::simulate) and
compares.

Modes: ``--cases JSON`` (a list of averaging settings, each trained from the
same start), ``--bad-seed`` (rank 1 uses another seed: every rank must fail).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def make_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(7, 13), torch.nn.Tanh(), torch.nn.Linear(13, 3))


def batch(replica: int, step: int):
    gen = torch.Generator().manual_seed(1000 * replica + step)
    x = torch.randn(16, 7, generator=gen)
    y = torch.randn(16, 3, generator=gen) + replica     # replicas see different data
    return x, y


def train_step(model, opt, replica: int, step: int) -> None:
    x, y = batch(replica, step)
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    opt.step()


def replica_train_step(model, opt, replica: int, step: int, ranks_per_replica: int,
                       part: int = None, group=None) -> None:
    """One step of a replica of ``ranks_per_replica`` ranks: each rank's own batch, the
    gradients averaged inside the replica (a gloo all-reduce over ``group`` when ``part``
    is this rank's position; accumulated in one process when ``part`` is None)."""
    import torch.distributed as dist

    opt.zero_grad()
    ids = [part] if part is not None else range(ranks_per_replica)
    for i in ids:
        x, y = batch(replica * ranks_per_replica + i, step)
        torch.nn.functional.mse_loss(model(x), y).backward()
    for p in model.parameters():
        if part is not None:
            dist.all_reduce(p.grad, group=group)
        p.grad.div_(ranks_per_replica)
    opt.step()


def named(model):
    return [(n, p) for n, p in model.named_parameters()]


def main() -> int:
    import deepspeed.comm as dscomm
    import torch.distributed as dist

    from megatron_asyncmesh.dataparallel.averaging import AveragingConfig, AveragingError, \
        SparseAverager

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--cases", default="[]")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--bad-seed", action="store_true")
    parser.add_argument("--ranks-per-replica", type=int, default=1)
    args = parser.parse_args()

    dist.init_process_group("gloo")
    from megatron_asyncmesh.distributed import init_deepspeed_comm

    init_deepspeed_comm()
    # Profile all_reduce only: deepspeed 0.19.8's logger calls exit(0) on ops its
    # bandwidth table does not know (all_gather_object among them).
    dscomm.configure(enabled=True, prof_all=False, prof_ops=["all_reduce"], verbose=False)
    rank, world = dist.get_rank(), dist.get_world_size()

    if args.bad_seed:
        model = make_model()
        try:
            SparseAverager(named(model), AveragingConfig(seed=7 if rank else 8), comm=dscomm)
        except AveragingError as exc:
            print(f"rank {rank}: AveragingError: {exc}", flush=True)
            return 3
        return 0

    R = args.ranks_per_replica
    replica, part = rank // R, rank % R
    inner = across = None
    if R > 1:        # replicas of R consecutive ranks; averaging between equal positions
        inner, _ = dist.new_subgroups_by_enumeration(
            [list(range(r * R, (r + 1) * R)) for r in range(world // R)])
        across, _ = dist.new_subgroups_by_enumeration(
            [list(range(i, world, R)) for i in range(R)])
    results = []
    for case in json.loads(args.cases):
        cfg = AveragingConfig(**case)
        model = make_model()
        opt = torch.optim.AdamW(model.parameters(), lr=0.05)
        averager = SparseAverager(named(model), cfg, comm=dscomm, group=across,
                                  replica_group=inner)
        dscomm.comms_logger.comms_dict.clear()
        per_step = []
        for step in range(args.steps):
            if R > 1:
                replica_train_step(model, opt, replica, step, R, part, inner)
            else:
                train_step(model, opt, rank, step)
            per_step.append(averager.step())
        averager.wait_in_flight()
        logged = sum(size * rec[0] for op, sizes in dscomm.comms_logger.comms_dict.items()
                     if op.startswith("all_reduce") for size, rec in sizes.items())
        params = [p.detach().clone() for p in model.parameters()]
        gathered = [None] * world
        dist.all_gather_object(gathered, {"params": [p.tolist() for p in params],
                                          "bytes_per_step": per_step,
                                          "bytes_sent": averager.bytes_sent,
                                          "replica_bytes_sent": averager.replica_bytes_sent,
                                          "comms_logger_bytes": logged})
        results.append({"case": case, "ranks": gathered})
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
