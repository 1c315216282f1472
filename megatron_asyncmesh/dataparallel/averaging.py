"""Asynchronous sparse parameter averaging across data-parallel replicas (AsyncMesh).

Replicas of a pipeline stage never all-reduce gradients. After every optimizer
step ``t`` each replica

1. selects the coordinates ``S_t`` of every tensor (the same ones on every
   replica: the selection is a pure function of a shared seed, the tensor's
   layout-independent name and ``t``),
2. copies ``W_i[S_t]`` into a snapshot and starts a non-blocking
   all-reduce of it over the stage's data-parallel group
   (``deepspeed.comm.all_reduce(..., async_op=True)``) and keeps training,
3. ``tau`` steps later waits for that all-reduce (long finished, normally)
   and writes the average ``A`` back with a correction for what the replica
   learnt meanwhile, its drift ``D_i = W_i^(t+tau)[S] - W_i^(t)[S]``:

   - ``avg``   (AsyncSPARTA):  ``W[S] <- A``
   - ``drift``:                ``W[S] <- A + lam D_i``
   - ``ema``   (AsyncMesh):    ``e[S] <- m e[S] + (1 - m) D_i``; ``W[S] <- A + lam e[S]``,
     ``e`` starts as the first drift seen by each coordinate, ``m`` is 0.5 and
     cosine-annealed to 0.99 from ``ema_start`` on.

``fraction = 1, delay = 0, avg`` is plain parameter averaging every step;
``delay = 0`` with random subsets is SPARTA.

Selectors (ALGORITHMS.md section 3):

- ``partition``: per tensor and per cycle a random permutation cut into
  ``N = ceil(1 / fraction)`` contiguous groups; step ``t`` takes group
  ``t mod N``, so every coordinate is averaged exactly once per cycle of N
  steps; a new permutation every cycle.
- ``bernoulli``: every coordinate independently with probability ``fraction``.

Everything each rank sends is counted (elements and bytes per step) so the
benchmark can set it against ZeRO's measured traffic; ``deepspeed.comm``'s
comms logger sees the same calls.
"""

from __future__ import annotations

import hashlib
import math
from collections import deque
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

CORRECTIONS = ("avg", "drift", "ema")
SELECTORS = ("partition", "bernoulli")


class AveragingError(ValueError):
    """Bad averaging settings or replicas that disagree; the message names the fix."""


@dataclass
class AveragingConfig:
    fraction: float = 0.05
    delay: int = 10
    correction: str = "ema"
    selector: str = "partition"
    lam: float = 1.0
    seed: int = 1234
    ema_start: int = 1000            # m stays at ema_momentum_start until this step
    ema_anneal_iters: int = 0        # cosine length; 0 = until the end of training
    ema_momentum_start: float = 0.5
    ema_momentum_end: float = 0.99
    train_iters: int = 0             # only to resolve ema_anneal_iters = 0

    def validate(self) -> "AveragingConfig":
        if not (isinstance(self.fraction, (int, float)) and 0.0 < self.fraction <= 1.0):
            raise AveragingError(
                f"--dp-fraction must be in (0, 1] (the share of each tensor averaged per "
                f"step, e.g. 0.05), got {self.fraction!r}.")
        if not isinstance(self.delay, int) or isinstance(self.delay, bool) or self.delay < 0:
            raise AveragingError(
                f"--dp-delay must be an integer >= 0 (steps between launching an average "
                f"and applying it; 0 = SPARTA), got {self.delay!r}.")
        if self.correction not in CORRECTIONS:
            raise AveragingError(f"--dp-correction must be one of {list(CORRECTIONS)}, got "
                                 f"{self.correction!r}.")
        if self.selector not in SELECTORS:
            raise AveragingError(f"--dp-selector must be one of {list(SELECTORS)}, got "
                                 f"{self.selector!r}.")
        for name in ("ema_momentum_start", "ema_momentum_end"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise AveragingError(f"{name} must be in [0, 1), got {getattr(self, name)}.")
        if self.ema_start < 0 or self.ema_anneal_iters < 0:
            raise AveragingError(
                f"--dp-ema-start and --dp-ema-anneal-iters must be >= 0, got "
                f"{self.ema_start} and {self.ema_anneal_iters}.")
        return self

    @property
    def groups(self) -> int:
        """N = ceil(1 / fraction), robust to 1 / 0.05 = 20.000000000000004."""
        return max(1, math.ceil(round(1.0 / self.fraction, 9)))

    def momentum(self, step: int) -> float:
        """EMA momentum m at ``step``: constant, then a half cosine from start to end."""
        lo, hi = self.ema_momentum_start, self.ema_momentum_end
        if step < self.ema_start:
            return lo
        length = self.ema_anneal_iters or max(1, self.train_iters - self.ema_start)
        x = min(1.0, (step - self.ema_start) / length)
        return hi - (hi - lo) * 0.5 * (1.0 + math.cos(math.pi * x))


def stable_seed(*parts) -> int:
    """A 63-bit seed from strings/ints, identical on every machine and Python."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _index_dtype(n: int) -> torch.dtype:
    # int32 indices halve the selector's memory; torch indexes with them directly.
    return torch.int32 if n < 2 ** 31 else torch.int64


class PartitionSelector:
    """Disjoint groups per tensor, cycled; a fresh permutation every cycle."""

    def __init__(self, keys: Sequence[str], numels: Sequence[int], fraction: float, seed: int,
                 device: Optional[torch.device] = None):
        self.keys, self.numels = list(keys), list(numels)
        self.seed = seed
        self.groups = AveragingConfig(fraction=fraction).groups
        self.device = device
        self._cycle = -1
        self._perms: List[torch.Tensor] = []
        self.builds = 0            # cycles whose permutations were drawn (once each)

    def permutations(self, cycle: int) -> List[torch.Tensor]:
        if cycle != self._cycle:
            self.builds += 1
            perms = []
            for key, n in zip(self.keys, self.numels):
                gen = torch.Generator().manual_seed(stable_seed(self.seed, key, "cycle", cycle))
                perms.append(torch.randperm(n, generator=gen, dtype=_index_dtype(n))
                             .to(self.device))
            self._perms, self._cycle = perms, cycle
        return self._perms

    def indices(self, step: int) -> List[torch.Tensor]:
        cycle, group = divmod(step, self.groups)
        out = []
        for perm, n in zip(self.permutations(cycle), self.numels):
            out.append(perm[group * n // self.groups:(group + 1) * n // self.groups])
        return out


class BernoulliSelector:
    """Each coordinate independently with probability ``fraction`` per step."""

    def __init__(self, keys: Sequence[str], numels: Sequence[int], fraction: float, seed: int,
                 device: Optional[torch.device] = None):
        self.keys, self.numels = list(keys), list(numels)
        self.fraction, self.seed, self.device = fraction, seed, device

    def indices(self, step: int) -> List[torch.Tensor]:
        out = []
        for key, n in zip(self.keys, self.numels):
            gen = torch.Generator().manual_seed(stable_seed(self.seed, key, "step", step))
            mask = torch.rand(n, generator=gen) < self.fraction
            out.append(mask.nonzero().view(-1).to(_index_dtype(n)).to(self.device))
        return out


def make_selector(cfg: AveragingConfig, keys, numels, device=None):
    cls = PartitionSelector if cfg.selector == "partition" else BernoulliSelector
    return cls(keys, numels, cfg.fraction, cfg.seed, device)


@dataclass
class _Pending:
    step: int                      # the optimizer step whose weights were snapshotted
    snapshot: torch.Tensor         # W_i^(t)[S_t], concatenated over tensors
    buffer: torch.Tensor           # being all-reduced (sum over replicas)
    work: object                   # the async handle (None once waited / restored)
    indices: List[torch.Tensor]    # S_t per tensor, carried to the apply tau steps later


class SparseAverager:
    """One replica's side of the averaging, over one data-parallel group.

    ``params`` is a list of ``(key, tensor)``: ``key`` names the tensor the same
    way on every replica (and in every pipeline layout). Call :meth:`step`
    once after every optimizer step. ``comm`` is ``deepspeed.comm`` (anything
    with its ``all_reduce / get_world_size / all_gather_object`` works: the
    single-process tests pass a fake group). ``after_apply`` runs after
    parameters were overwritten (e.g. copy fp32 main params into bf16 model
    params).
    """

    def __init__(self, params: Sequence[Tuple[str, torch.Tensor]], cfg: AveragingConfig,
                 group=None, comm=None, after_apply: Optional[Callable[[], None]] = None):
        if comm is None:
            import deepspeed.comm as comm
        self.cfg = cfg.validate()
        self.comm, self.group = comm, group
        self.keys = [k for k, _ in params]
        self.params = [p for _, p in params]
        if len(set(self.keys)) != len(self.keys):
            raise AveragingError("SparseAverager needs distinct parameter keys.")
        self.world = comm.get_world_size(group=group)
        self.after_apply = after_apply
        device = self.params[0].device if self.params else None
        self.selector = make_selector(cfg, self.keys, [p.numel() for p in self.params], device)
        self.pending: deque = deque()
        # The drift EMA (ema correction only) and which coordinates it has seen: with the
        # partition selector a coordinate applied at step s was seen before iff s is past
        # the first cycle (every coordinate is applied once per cycle, in step order), so
        # only the Bernoulli selector keeps a mask.
        self.ema: Dict[int, torch.Tensor] = {}
        self.seen: Dict[int, torch.Tensor] = {}
        if cfg.correction == "ema":
            for j, p in enumerate(self.params):
                self.ema[j] = torch.zeros(p.numel(), dtype=torch.float32, device=p.device)
                if cfg.selector != "partition":
                    self.seen[j] = torch.zeros(p.numel(), dtype=torch.bool, device=p.device)
        self.steps = 0                 # optimizer steps seen (the next snapshot's t)
        self.elements_sent = 0
        self.bytes_sent = 0
        self.last_step_bytes = 0
        self.check_replicas_agree()

    # ------------------------------------------------------------------ set-up
    def signature(self) -> dict:
        shapes = [(k, tuple(p.shape), str(p.dtype)) for k, p in zip(self.keys, self.params)]
        digest = hashlib.sha256(repr(shapes).encode()).hexdigest()[:16]
        fields = asdict(self.cfg)
        fields.pop("train_iters")
        return {**fields, "tensors": digest}

    def check_replicas_agree(self) -> None:
        """Every replica must select the same coordinates: same seed, settings and
        tensors. One all_gather_object; every rank raises the same error."""
        if self.world == 1:
            return
        mine = self.signature()
        gathered = [None] * self.world
        self.comm.all_gather_object(gathered, mine, group=self.group)
        for other in gathered:
            if other != mine:
                diff = {k: (mine.get(k), other.get(k)) for k in set(mine) | set(other)
                        if mine.get(k) != other.get(k)}
                raise AveragingError(
                    f"data-parallel replicas disagree on the sparse-averaging settings "
                    f"{diff} (this rank, another): they would average different coordinates. "
                    f"Launch every rank with the same --dp-* flags and --dp-seed / --seed.")

    # ------------------------------------------------------------------ per step
    def _gather(self, indices: List[torch.Tensor]) -> torch.Tensor:
        return torch.cat([p.detach().view(-1)[i].float() for p, i in zip(self.params, indices)])

    def _scatter(self, indices: List[torch.Tensor], values: torch.Tensor) -> None:
        offset = 0
        with torch.no_grad():
            for p, i in zip(self.params, indices):
                n = i.numel()
                p.view(-1)[i] = values[offset:offset + n].to(p.dtype)
                offset += n

    def step(self) -> int:
        """Snapshot and launch this step's average; apply those now ``delay`` old.
        Returns the bytes this rank handed to the all-reduce in this step."""
        t = self.steps
        self.steps += 1
        indices = self.selector.indices(t)
        snapshot = self._gather(indices)
        buffer = snapshot.clone()
        work = None
        if self.world > 1:
            work = self.comm.all_reduce(buffer, group=self.group, async_op=True)
        self.pending.append(_Pending(t, snapshot, buffer, work, indices))
        self.last_step_bytes = buffer.numel() * buffer.element_size() if self.world > 1 else 0
        self.elements_sent += buffer.numel() if self.world > 1 else 0
        self.bytes_sent += self.last_step_bytes
        while self.pending and self.pending[0].step + self.cfg.delay <= t:
            self._apply(self.pending.popleft(), t)
        return self.last_step_bytes

    def _apply(self, item: _Pending, now: int) -> None:
        if item.work is not None:
            item.work.wait()
            item.work = None
        indices = item.indices
        average = item.buffer / self.world
        cfg = self.cfg
        if cfg.correction == "avg":
            new = average
        else:
            drift = self._gather(indices) - item.snapshot
            if cfg.correction == "drift":
                new = average + cfg.lam * drift
            else:
                m = cfg.momentum(now)
                ema = self._update_ema(indices, drift, m, item.step)
                new = average + cfg.lam * ema
        self._scatter(indices, new)
        if self.after_apply is not None:
            self.after_apply()

    def _update_ema(self, indices, drift: torch.Tensor, m: float, step: int) -> torch.Tensor:
        out, offset = [], 0
        past_first_cycle = step >= self.cfg.groups
        for j, (p, idx) in enumerate(zip(self.params, indices)):
            n = idx.numel()
            d = drift[offset:offset + n]
            offset += n
            if j in self.seen:
                e = torch.where(self.seen[j][idx], m * self.ema[j][idx] + (1.0 - m) * d, d)
                self.seen[j][idx] = True
            else:
                e = m * self.ema[j][idx] + (1.0 - m) * d if past_first_cycle else d
            self.ema[j][idx] = e
            out.append(e)
        return torch.cat(out) if out else drift

    def wait_in_flight(self) -> None:
        """Wait for every launched all-reduce without applying it (the delay queue
        is unchanged). Call before a process group goes away: gloo runs async
        collectives on worker threads, and a peer leaving while one of them still
        runs aborts the process."""
        for item in self.pending:
            if item.work is not None:
                item.work.wait()
                item.work = None

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Everything a resumed run needs, as tensors: counters, the averages still
        waiting for their delay (snapshot and summed buffer; their coordinates are
        recomputed from the step), the drift EMA. Waits for in-flight all-reduces
        (they finished long before, normally)."""
        self.wait_in_flight()
        state = {"counters": torch.tensor([self.steps, self.elements_sent, self.bytes_sent],
                                          dtype=torch.int64)}
        for item in self.pending:
            state[f"pending.{item.step}.snapshot"] = item.snapshot
            state[f"pending.{item.step}.buffer"] = item.buffer
        for j in self.ema:
            state[f"ema.{self.keys[j]}"] = self.ema[j]
            state[f"seen.{self.keys[j]}"] = self._seen_mask(j).to(torch.uint8)
        return state

    def _seen_mask(self, j: int) -> torch.Tensor:
        """Coordinates of tensor ``j`` the EMA has seen (stored by the Bernoulli selector;
        the partition selector's follows from the steps applied). Checkpoints keep the
        mask for both, so their format does not depend on the selector."""
        if j in self.seen:
            return self.seen[j]
        applied = self.steps - len(self.pending)        # steps 0 .. applied-1 were applied
        p = self.params[j]
        mask = torch.zeros(p.numel(), dtype=torch.bool, device=p.device)
        if applied >= self.cfg.groups:
            mask.fill_(True)
        else:
            for s in range(applied):
                mask[self.selector.indices(s)[j]] = True
        return mask

    def state_template(self, steps: int) -> dict:
        """Empty tensors shaped like :meth:`state_dict` after ``steps`` steps (what a
        checkpoint loader needs before reading)."""
        device = self.params[0].device if self.params else None
        state = {"counters": torch.zeros(3, dtype=torch.int64)}
        for s in range(max(0, steps - self.cfg.delay), steps):
            n = sum(int(i.numel()) for i in self.selector.indices(s))
            state[f"pending.{s}.snapshot"] = torch.empty(n, device=device)
            state[f"pending.{s}.buffer"] = torch.empty(n, device=device)
        for j in self.ema:
            state[f"ema.{self.keys[j]}"] = torch.empty_like(self.ema[j])
            state[f"seen.{self.keys[j]}"] = torch.empty(self.ema[j].numel(), dtype=torch.uint8,
                                                         device=device)
        return state

    def load_state_dict(self, state: dict) -> None:
        self.steps, self.elements_sent, self.bytes_sent = (int(x) for x in state["counters"])
        pending = sorted(int(k.split(".")[1]) for k in state
                         if k.startswith("pending.") and k.endswith(".snapshot"))
        self.pending = deque(_Pending(s, state[f"pending.{s}.snapshot"],
                                      state[f"pending.{s}.buffer"], None,
                                      self.selector.indices(s)) for s in pending)
        for j in self.ema:
            self.ema[j].copy_(state[f"ema.{self.keys[j]}"])
            if j in self.seen:
                self.seen[j].copy_(state[f"seen.{self.keys[j]}"].bool())

    def state_bytes_per_parameter(self) -> float:
        """Bytes the averager keeps per parameter besides the pending averages: the drift
        EMA, the seen mask (Bernoulli) and the selector's current permutations."""
        numel = sum(p.numel() for p in self.params) or 1
        held = sum(t.numel() * t.element_size() for t in self.ema.values())
        held += sum(t.numel() * t.element_size() for t in self.seen.values())
        held += sum(t.numel() * t.element_size() for t in getattr(self.selector, "_perms", []))
        return held / numel

    def pending_bytes_per_parameter(self) -> float:
        numel = sum(p.numel() for p in self.params) or 1
        return sum(i.snapshot.numel() * i.snapshot.element_size()
                   + i.buffer.numel() * i.buffer.element_size()
                   + sum(x.numel() * x.element_size() for x in i.indices)
                   for i in self.pending) / numel

    def stats(self) -> dict:
        return {"steps": self.steps, "elements_sent": self.elements_sent,
                "bytes_sent": self.bytes_sent,
                "bytes_per_step": self.bytes_sent / self.steps if self.steps else 0.0,
                "replicas": self.world, **{f"cfg_{k}": v for k, v in asdict(self.cfg).items()}}


def expected_elements_per_step(numels: Sequence[int], fraction: float, step: int) -> int:
    """What the partition selector sends at ``step``: sum of its group sizes."""
    groups = AveragingConfig(fraction=fraction).groups
    g = step % groups
    return sum((g + 1) * n // groups - g * n // groups for n in numels)
