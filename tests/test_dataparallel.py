"""AsyncMesh data axis: selectors, exactness against a single-process replay,
byte accounting, the Megatron integration against Megatron's own synchronous
data parallelism, the full PP x DP mesh, bad input."""

import json
import os

import pytest
import torch

from megatron_asyncmesh.dataparallel.averaging import (
    AveragingConfig, BernoulliSelector, BlockSelector, PartitionSelector, SparseAverager,
    expected_elements_per_step, make_selector, selected_coordinates)
from tests.dp_worker import make_model, replica_train_step, train_step
from tests.harness import REPO, evaluate, launch, read_metrics, read_summary, tool, train

NUMELS = [1, 7, 100, 1001]
KEYS = ["a", "b", "c", "d"]


@pytest.mark.parametrize("fraction", [0.05, 0.3, 1.0])
@pytest.mark.parametrize("kind", ["partition", "block"])
def test_partition_covers_every_coordinate_once_per_cycle(fraction, kind):
    """Both cycling selectors: every coordinate exactly once per cycle, a new draw per
    cycle; the block selector (blocks of 8, so tensors of 1 and 7 coordinates are one
    short block) selects whole blocks, gathered and scattered as the coordinates say."""
    sel = (PartitionSelector(KEYS, NUMELS, fraction, seed=3) if kind == "partition" else
           BlockSelector(KEYS, NUMELS, fraction, seed=3, block_size=8))
    groups = sel.groups
    assert groups == {0.05: 20, 0.3: 4, 1.0: 1}[fraction]
    for cycle in range(2):
        seen = [torch.zeros(n, dtype=torch.long) for n in NUMELS]
        for step in range(cycle * groups, (cycle + 1) * groups):
            idx = selected_coordinates(sel, step)
            if kind == "partition":
                assert sum(i.numel() for i in idx) == expected_elements_per_step(
                    NUMELS, fraction, step)
            else:
                for i, n in zip(idx, NUMELS):      # whole blocks of 8 (or the short last)
                    blocks = torch.unique(i // 8)
                    assert i.numel() == sum(min(8, n - 8 * int(b)) for b in blocks)
            for s, i, sl, n in zip(seen, idx, sel.select(step), NUMELS):
                s[i] += 1
                assert sl.numel() == i.numel()
                x = torch.arange(n, dtype=torch.float32) * 3
                out = torch.empty(sl.numel())
                sl.gather(x, out)
                assert torch.equal(out, x[i])
                sl.scatter(x, -out)
                assert torch.equal(x[i], -out)
            assert sel.builds == cycle + 1
        for s in seen:
            assert bool((s == 1).all())          # exactly once in the cycle
    first, second = selected_coordinates(sel, 0), selected_coordinates(sel, groups)
    if fraction < 1:                             # a new permutation per cycle
        assert not torch.equal(first[3], second[3])


def test_selectors_are_shared_by_seed_and_differ_per_tensor():
    a = PartitionSelector(KEYS, NUMELS, 0.05, seed=3)
    b = PartitionSelector(KEYS, NUMELS, 0.05, seed=3)
    c = PartitionSelector(KEYS, NUMELS, 0.05, seed=4)
    for step in (0, 5, 21):
        assert all(torch.equal(x, y) for x, y in zip(selected_coordinates(a, step),
                                                     selected_coordinates(b, step)))
    assert not torch.equal(selected_coordinates(a, 0)[3], selected_coordinates(c, 0)[3])
    d = BlockSelector(KEYS, NUMELS, 0.05, seed=3, block_size=8)
    e = BlockSelector(KEYS, NUMELS, 0.05, seed=3, block_size=8)
    assert all(torch.equal(x, y) for x, y in zip(selected_coordinates(d, 3),
                                                 selected_coordinates(e, 3)))
    bern = BernoulliSelector(["w"], [200_000], 0.05, seed=1)
    counts = [selected_coordinates(bern, step)[0].numel() / 200_000 for step in range(3)]
    assert all(abs(c - 0.05) < 0.003 for c in counts)      # 6 sigma ~ 0.003
    assert not torch.equal(selected_coordinates(bern, 0)[0], selected_coordinates(bern, 1)[0])


@pytest.mark.parametrize("kind", ["partition", "block"])
def test_selection_is_drawn_once_per_cycle_and_the_state_is_small(kind):
    """Each step's coordinates travel with its pending average to the step that applies
    it, so a cycling selector draws each cycle once (applying step t - tau's average
    used to ask for the previous cycle again, rebuilding both every cycle), and needs
    no seen-mask. Kept per parameter: the fp32 EMA, plus the int32 permutation of the
    current cycle (partition) or its int64 block numbers (block, 8 / 64 bytes)."""

    class OneRank:
        @staticmethod
        def get_world_size(group=None):
            return 1

    params = [("a", torch.zeros(1000)), ("b", torch.zeros(37, 11))]
    avg = SparseAverager(params, AveragingConfig(fraction=0.05, delay=10, selector=kind,
                                                 block_size=64), comm=OneRank())
    for _ in range(65):                 # steps 0-64: cycles 0-3 of 20 steps
        avg.step()
    assert avg.selector.builds == 4
    full_blocks = 1000 // 64 + 407 // 64
    assert avg.state_bytes_per_parameter() == (
        8.0 if kind == "partition" else 4.0 + 8 * full_blocks / 1407)
    assert avg.seen == {}


@pytest.mark.parametrize("case", [{"selector": "block", "block_size": 4},
                                  {"selector": "block", "block_size": 4, "outer_lr": 1.3,
                                   "outer_momentum": 0.6},
                                  {"selector": "partition", "dense_iters": 3},
                                  {"selector": "bernoulli", "dense_iters": 2}])
def test_averager_state_round_trip(case):
    """state_dict -> state_template -> load_state_dict mid-run (pending averages of two
    cycles, the EMA within and past its first cycle, after a dense warm start) continues
    exactly as the averager that was not interrupted."""

    class OneRank:
        @staticmethod
        def get_world_size(group=None):
            return 1

    cfg = dict(fraction=0.3, delay=3, correction="ema", ema_start=2, train_iters=20, **case)
    gen = torch.Generator().manual_seed(0)
    start = [torch.randn(n, generator=gen) for n in (91, 13, 39, 3)]
    steps = [[torch.randn(n, generator=gen) for n in (91, 13, 39, 3)] for _ in range(14)]

    def run(stop=None):
        params = [("w%d" % i, t.clone()) for i, t in enumerate(start)]
        avg = SparseAverager(params, AveragingConfig(**cfg), comm=OneRank())
        for t, update in enumerate(steps):
            if t == stop:
                state = {k: v.clone() for k, v in avg.state_dict().items()}
                template = SparseAverager(params, AveragingConfig(**cfg),
                                          comm=OneRank()).state_template(t)
                assert {k: (v.shape, v.dtype) for k, v in template.items()} == \
                    {k: (v.shape, v.dtype) for k, v in state.items()}
                avg = SparseAverager(params, AveragingConfig(**cfg), comm=OneRank())
                avg.load_state_dict(state)
            for (_, p), u in zip(params, update):
                p.add_(u, alpha=0.1)
            avg.step()
        return [p for _, p in params]

    straight = run()
    for stop in (4, 6, 9):
        assert all(torch.equal(a, b) for a, b in zip(run(stop), straight)), stop


def test_outer_step_anchor_is_reduced_once_and_not_on_resume():
    """The outer step's anchor (the replicas' mean of the starting weights) costs one
    dense all-reduce, at the first sparse step, not in the constructor: a resumed run
    loads it from its checkpoint and a dense warm start sets it, so neither sends the
    whole model for it; new weights before the first step (a weights-only checkpoint)
    reset it. Two replicas with equal weights: the mean is the weights."""

    class Work:
        def wait(self):
            pass

    class TwoReplicas:
        def __init__(self):
            self.reduced = []                       # sizes of every all-reduce

        def get_world_size(self, group=None):
            return 2

        def get_rank(self, group=None):
            return 0

        def all_gather_object(self, out, obj, group=None):
            out[:] = [obj] * len(out)

        def all_reduce(self, t, group=None, async_op=False):
            self.reduced.append(t.numel())
            t.mul_(2)                               # the other replica holds the same
            return Work() if async_op else None

    def averager(comm, params, **over):
        cfg = AveragingConfig(fraction=0.5, delay=1, correction="ema", outer_lr=1.5,
                              outer_momentum=0.5, selector="partition", train_iters=10,
                              **over)
        return SparseAverager(params, cfg, comm=comm)

    numels = [40, 9]
    whole = sum(numels)
    fresh = TwoReplicas()
    params = [(f"w{i}", torch.randn(n)) for i, n in enumerate(numels)]
    avg = averager(fresh, params)
    assert fresh.reduced == []                      # nothing in the constructor
    start = [p.clone() for _, p in params]
    for _, p in params:                             # new weights before the first step
        p.add_(1.0)
    avg.reset_anchor()
    avg.step()
    assert fresh.reduced[:2] == numels and sum(fresh.reduced[2:]) < whole
    assert all(torch.equal(avg.anchor[j], s + 1.0) for j, s in enumerate(start))
    for _ in range(3):
        avg.step()
    state = {k: v.clone() for k, v in avg.state_dict().items()}
    assert len(fresh.reduced) == 6 and sum(fresh.reduced[2:]) == 2 * whole  # 4 selections

    resumed = TwoReplicas()
    again = averager(resumed, params)
    again.load_state_dict(state)
    for _ in range(4):
        again.step()
    assert len(resumed.reduced) == 4 and sum(resumed.reduced) == 2 * whole   # 4 selections
    with pytest.raises(Exception, match="reset_anchor after 8 steps"):
        again.reset_anchor()

    warm = TwoReplicas()
    dense = averager(warm, params, dense_iters=2)
    for _ in range(4):
        dense.step()
    assert warm.reduced[:4] == numels * 2           # two dense steps, tensor by tensor
    assert len(warm.reduced) == 6 and sum(warm.reduced[4:]) <= whole   # two selections


def test_resumed_runs_keep_their_selector():
    """--dp-selector auto: block for a new run, the checkpoint's selector on resume
    (checkpoints from before the block selector record partition); an explicit selector
    or block size other than the checkpoint's is refused with the fix."""
    from megatron_asyncmesh.dataparallel.config import DataParallelConfig, resolve_selector
    from megatron_asyncmesh.options import ConfigError

    new = DataParallelConfig(dp_averaging="sparse")
    resolve_selector(new, None, "--load x")
    assert (new.dp_selector, new.dp_block_size) == ("block", 1024)
    legacy = {"dp_averaging": "sparse", "dp_selector": "partition"}   # no dp_block_size
    resumed = DataParallelConfig(dp_averaging="sparse")
    resolve_selector(resumed, legacy, "--load x")
    assert resumed.dp_selector == "partition"
    saved = {"dp_averaging": "sparse", "dp_selector": "block", "dp_block_size": 256}
    resumed = DataParallelConfig(dp_averaging="sparse")
    resolve_selector(resumed, saved, "--load x")
    assert (resumed.dp_selector, resumed.dp_block_size) == ("block", 256)
    for mine, theirs in ((dict(dp_selector="block"), legacy),
                         (dict(dp_selector="block", dp_block_size=512), saved)):
        with pytest.raises(ConfigError, match="--dp-selector auto"):
            resolve_selector(DataParallelConfig(dp_averaging="sparse", **mine), theirs,
                             "--load x")


def test_overlap_note_names_the_settings_where_averages_overlap():
    """N = ceil(1/p) <= tau: every coordinate is selected again before its average has
    landed; the note names both flags and the bound. mesh.yaml's p 0.2, tau 2 (N = 5),
    the paper's p 0.05, tau 10 (N = 20) and undelayed averaging get none."""
    for fraction, delay in ((0.2, 2), (0.05, 10), (1.0, 0), (0.3, 3)):
        assert AveragingConfig(fraction=fraction, delay=delay).overlap_note() is None
    for fraction, delay in ((1.0, 2), (0.5, 2), (0.05, 50)):
        note = AveragingConfig(fraction=fraction, delay=delay).overlap_note()
        assert f"--dp-fraction {fraction} with --dp-delay {delay}" in note, note
        assert "1 / --dp-delay" in note


def test_ema_momentum_schedule():
    cfg = AveragingConfig(ema_start=10, ema_anneal_iters=20)
    assert cfg.momentum(0) == cfg.momentum(10) == 0.5
    assert abs(cfg.momentum(20) - 0.745) < 1e-12          # half-way: the mean
    assert cfg.momentum(30) == cfg.momentum(99) == 0.99


def simulate(case: dict, steps: int, world: int = 2, ranks_per_replica: int = 1):
    """Single-process replay of ``world`` replicas: same models, data, AdamW,
    selector, delay and correction as tests/dp_worker.py, with the averaging
    written out densely per tensor from ALGORITHMS.md section 3. Replicas of
    ``ranks_per_replica`` ranks: each step's gradient is the mean over the replica's
    ranks' batches."""
    cfg = AveragingConfig(**case)
    models = [make_model() for _ in range(world)]
    opts = [torch.optim.AdamW(m.parameters(), lr=0.05) for m in models]
    params = [list(m.parameters()) for m in models]
    keys = [n for n, _ in models[0].named_parameters()]
    selector = make_selector(cfg, keys, [p.numel() for p in params[0]])
    ema = [[torch.zeros(p.numel()) for p in params[0]] for _ in range(world)]
    seen = [[torch.zeros(p.numel(), dtype=torch.bool) for p in params[0]] for _ in range(world)]
    # The outer step: every replica's anchor is the same consensus, so one suffices here.
    anchor = [p.detach().clone().view(-1) for p in params[0]]
    outer_m = [torch.zeros(p.numel()) for p in params[0]]
    queue = []
    for t in range(steps):
        for r in range(world):
            if ranks_per_replica > 1:
                replica_train_step(models[r], opts[r], r, t, ranks_per_replica)
            else:
                train_step(models[r], opts[r], r, t)
        if t < cfg.dense_iters:                 # warm start: every parameter, now
            for j in range(len(params[0])):
                mean = (params[0][j].data + sum(params[r][j].data for r in range(1, world))
                        ) / world
                for r in range(world):
                    params[r][j].data.copy_(mean)
                anchor[j] = mean.clone().view(-1)
            continue
        idx = selected_coordinates(selector, t - cfg.dense_iters)   # sparse steps
        queue.append((t, idx, [[p.detach().view(-1)[i].clone() for p, i in zip(params[r], idx)]
                               for r in range(world)]))
        while queue and queue[0][0] + cfg.delay <= t:
            _, idx0, snaps = queue.pop(0)
            m = cfg.momentum(t)
            for j, i in enumerate(idx0):
                total = snaps[0][j].clone()
                for r in range(1, world):
                    total = total + snaps[r][j]
                average = total / world
                if cfg.outer:                   # G = Z - A; M <- mu M + G; Z <- Z - eta(G + mu M)
                    z = anchor[j][i]
                    g = z - average
                    if cfg.outer_momentum:
                        outer_m[j][i] = cfg.outer_momentum * outer_m[j][i] + g
                        g = torch.add(g, outer_m[j][i], alpha=cfg.outer_momentum)
                    average = torch.sub(z, g, alpha=cfg.outer_lr)
                    anchor[j][i] = average
                for r in range(world):
                    flat = params[r][j].data.view(-1)
                    drift = flat[i] - snaps[r][j]
                    if cfg.correction == "avg":
                        new = average
                    elif cfg.correction == "drift":
                        new = average + cfg.lam * drift
                    else:
                        old = ema[r][j][i]
                        e = torch.where(seen[r][j][i], m * old + (1 - m) * drift, drift)
                        ema[r][j][i] = e
                        seen[r][j][i] = True
                        new = average + cfg.lam * e
                    flat[i] = new
    return [[p.detach() for p in ps] for ps in params]


P = {"selector": "partition"}
CASES = [
    {"fraction": 1.0, "delay": 0, "correction": "avg", **P},
    {"fraction": 0.3, "delay": 0, "correction": "avg", **P},                # SPARTA
    {"fraction": 0.3, "delay": 3, "correction": "avg", **P},
    {"fraction": 0.25, "delay": 2, "correction": "drift", "lam": 0.5, **P},
    {"fraction": 0.3, "delay": 3, "correction": "ema", "ema_start": 4, "ema_anneal_iters": 5,
     **P},
    {"fraction": 0.2, "delay": 2, "correction": "ema", "selector": "bernoulli"},
    # Blocks of 4: whole blocks and short last blocks of the 91, 13, 39 and 3 weights.
    {"fraction": 0.3, "delay": 3, "correction": "ema", "ema_start": 4, "ema_anneal_iters": 5,
     "selector": "block", "block_size": 4},
    # A synchronous warm start of 3 dense steps, then the block selector.
    {"fraction": 0.3, "delay": 3, "correction": "ema", "selector": "block", "block_size": 4,
     "dense_iters": 3},
    # The outer step: Nesterov on the averaged update (after a warm start, with the EMA),
    # and a plain longer step on the undelayed average.
    {"fraction": 0.3, "delay": 3, "correction": "ema", "selector": "block", "block_size": 4,
     "dense_iters": 2, "outer_lr": 0.8, "outer_momentum": 0.5, "ema_start": 4},
    {"fraction": 0.25, "delay": 0, "correction": "avg", "outer_lr": 1.5, **P},
    # Averages in flight over the same coordinates every step (N = 2 <= tau = 3; p = 1,
    # tau = 2 with blocks): the snapshot is taken before the due average lands.
    {"fraction": 0.5, "delay": 3, "correction": "ema", "ema_start": 4, **P},
    {"fraction": 1.0, "delay": 2, "correction": "drift", "selector": "block",
     "block_size": 4},
]
STEPS = 12


@pytest.fixture(scope="module")
def distributed_cases(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("dp") / "cases.json")
    launch([os.path.join(REPO, "tests", "dp_worker.py"), "--out", out, "--cases",
            json.dumps(CASES), "--steps", str(STEPS)], nproc=2, timeout=240)
    with open(out) as f:
        return json.load(f)


@pytest.mark.parametrize("k", range(len(CASES)))
def test_distributed_equals_single_process_replay(distributed_cases, k):
    """Two gloo ranks with deepspeed.comm's async all-reduce end bitwise where the
    single-process replay of the same replicas ends."""
    res = distributed_cases[k]
    assert res["case"] == CASES[k]
    expected = simulate(CASES[k], STEPS)
    start = [p.detach() for p in make_model().parameters()]
    for r, got in enumerate(res["ranks"]):
        for p_got, p_ref, p0 in zip(got["params"], expected[r], start):
            p_got = torch.tensor(p_got)
            assert torch.equal(p_got, p_ref), (r, (p_got - p_ref).abs().max())
            assert (p_got - p0).abs().max() > 1e-2           # it trained
    if CASES[k]["fraction"] == 1.0 and CASES[k]["delay"] == 0:
        # Plain parameter averaging: both replicas hold the same mean every step.
        assert res["ranks"][0]["params"] == res["ranks"][1]["params"]
    else:
        assert res["ranks"][0]["params"] != res["ranks"][1]["params"]


# Replicas of two ranks: the parts of each selection split over the replica's ranks,
# the dense warm-up and the outer step's anchor all-reduce (CASES[9]) split the same way.
REPLICA_CASES = [CASES[2], CASES[4], CASES[7], CASES[8], CASES[9]]


@pytest.fixture(scope="module")
def replica_cases(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("dp") / "replicas.json")
    launch([os.path.join(REPO, "tests", "dp_worker.py"), "--out", out, "--cases",
            json.dumps(REPLICA_CASES), "--steps", str(STEPS), "--ranks-per-replica", "2"],
           nproc=4, timeout=240)
    with open(out) as f:
        return json.load(f)


@pytest.mark.parametrize("k", range(len(REPLICA_CASES)))
def test_replicas_of_two_ranks_equal_single_process_replay(replica_cases, k):
    """4 gloo ranks = 2 replicas x 2 ranks (gradient all-reduce inside a replica, each
    rank averaging half of every selection across replicas, the halves all-gathered
    inside the replica) end bitwise where one process replaying 2 replicas, each
    stepping on the mean gradient of its two batches, ends. Each rank sends half of
    what a one-rank replica sends across the replicas, the outer step's anchor (the
    whole model, once) included."""
    res = replica_cases[k]
    assert res["case"] == REPLICA_CASES[k]
    expected = simulate(REPLICA_CASES[k], STEPS, world=2, ranks_per_replica=2)
    for rank, got in enumerate(res["ranks"]):
        for p_got, p_ref in zip(got["params"], expected[rank // 2]):
            assert torch.equal(torch.tensor(p_got), p_ref), (rank, k)
    assert res["ranks"][0]["params"] == res["ranks"][1]["params"]     # one replica
    assert res["ranks"][0]["params"] != res["ranks"][2]["params"]     # two replicas
    numels = [p.numel() for p in make_model().parameters()]
    case = REPLICA_CASES[k]
    for got in res["ranks"]:
        assert got["comms_logger_bytes"] == got["bytes_sent"] == sum(got["bytes_per_step"])
        assert got["replica_bytes_sent"] > 0
        if case.get("selector", "partition") == "partition":
            anchor = 4 * -(-sum(numels) // 2) \
                if case.get("outer_lr", 1.0) != 1.0 and not case.get("dense_iters") else 0
            assert got["bytes_per_step"] == [
                4 * -(-expected_elements_per_step(numels, case["fraction"], t) // 2)
                + (anchor if t == 0 else 0) for t in range(STEPS)]


def test_dense_averaging_is_the_parameter_mean():
    """p = 1, tau = 0: after each step every replica holds mean_r(W_r) (written here
    without selector or queue)."""
    models = [make_model() for _ in range(2)]
    opts = [torch.optim.AdamW(m.parameters(), lr=0.05) for m in models]
    for t in range(STEPS):
        for r in range(2):
            train_step(models[r], opts[r], r, t)
        with torch.no_grad():
            for pa, pb in zip(models[0].parameters(), models[1].parameters()):
                mean = (pa + pb) / 2
                pa.copy_(mean)
                pb.copy_(mean)
    replay = simulate(CASES[0], STEPS)
    for p, q in zip(models[0].parameters(), replay[0]):
        assert torch.equal(p.detach(), q)


def test_bytes_per_step_match_the_selection_and_the_comms_logger(distributed_cases):
    model = make_model()
    numels = [p.numel() for p in model.parameters()]
    for res, case in zip(distributed_cases, CASES):
        for rank in res["ranks"]:
            assert rank["comms_logger_bytes"] == rank["bytes_sent"] == sum(rank["bytes_per_step"])
            if case.get("selector", "partition") == "partition":
                # The outer step's anchor: the whole model once, at the first step.
                anchor = 4 * sum(numels) if case.get("outer_lr", 1.0) != 1.0 else 0
                assert rank["bytes_per_step"] == [
                    4 * expected_elements_per_step(numels, case["fraction"], t)
                    + (anchor if t == 0 else 0) for t in range(STEPS)]


def test_replicas_disagreeing_on_the_seed_fail_on_every_rank(tmp_path):
    res = launch([os.path.join(REPO, "tests", "dp_worker.py"), "--out", str(tmp_path / "x"),
                  "--bad-seed"], nproc=2, timeout=120, check=False)
    assert res.returncode != 0
    assert "replicas disagree" in res.output and "--dp-seed" in res.output
    assert res.output.count("AveragingError") >= 2                 # both ranks, no hang


@pytest.mark.parametrize("flags,message", [
    (["--dp-fraction", "0"], "--dp-fraction must be in (0, 1]"),
    (["--dp-fraction", "1.5"], "--dp-fraction must be in (0, 1]"),
    (["--dp-delay", "-1"], "--dp-delay must be an integer >= 0"),
    (["--dp-lambda", "-0.5"], "--dp-lambda must be in [0, 4]"),
    (["--dp-lambda", "4.5"], "--dp-lambda must be in [0, 4]"),
    (["--dp-lambda", "nan"], "--dp-lambda must be in [0, 4]"),
    (["--use-distributed-optimizer"],
     "--dp-averaging sparse with --use-distributed-optimizer needs replicas of several ranks"),
    (["--optimizer", "muon", "--use-layer-wise-distributed-optimizer"],
     "--dp-averaging sparse with --use-layer-wise-distributed-optimizer needs replicas of "
     "several ranks"),
])
def test_bad_averaging_flags(flags, message):
    from megatron_asyncmesh.config import ConfigError, parse_config

    with pytest.raises(ConfigError) as exc:
        parse_config(["--dp-averaging", "sparse", *flags])
    assert message in str(exc.value)


SGD = ["--optimizer", "sgd", "--sgd-momentum", "0.9", "--clip-grad", "0", "--lr", "0.05",
       "--train-iters", "6", "--eval-interval", "3"]


DENSE = ["--dp-averaging", "sparse", "--dp-fraction", "1", "--dp-delay", "0",
         "--dp-correction", "avg"]


def _losses(run_dir):
    train_rows, val_rows = read_metrics(run_dir)
    return ([r["loss"] for r in train_rows], [r["val_loss"] for r in val_rows],
            read_summary(run_dir), run_dir)


@pytest.fixture(scope="module")
def megatron_sync(tmp_path_factory, tiny_data):
    """Megatron's own synchronous data parallelism (DDP gradient all-reduce), DP = 2."""
    run_dir = str(tmp_path_factory.mktemp("sync") / "sync")
    train(run_dir, nproc=2, args=[*SGD, "--data-path", tiny_data["data_path"],
                                  "--tokenizer-model", tiny_data["tokenizer_model"]])
    return _losses(run_dir)


def _close(a, b, tol=1e-5):
    assert len(a[0]) == len(b[0]) == 6 and len(a[1]) == len(b[1]) == 3
    for x, y in zip(a[0] + a[1], b[0] + b[1]):
        assert abs(x - y) < tol, (a[:2], b[:2])


def test_dense_averaging_equals_megatron_data_parallel(tmp_path, data_args, megatron_sync):
    """SGD with momentum is linear in the gradient, so averaging the parameters of
    two independent replicas after every step (p = 1, tau = 0) is the same
    training as Megatron's gradient all-reduce (DDP), up to rounding. The loss is
    checked at every step (sparse averaging differs: tests/test_checkpoint.py's mesh)."""
    run_dir = str(tmp_path / "dense")
    train(run_dir, nproc=2, args=[*SGD, *DENSE, *data_args])
    sync, dense = megatron_sync, _losses(run_dir)
    _close(sync, dense)
    assert sync[2]["dp_averaging_stats"] == [None, None]
    assert sync[2]["grad_all_reduce_bytes_per_step"][0] > 0
    stats = dense[2]["dp_averaging_stats"]
    assert stats[0]["bytes_sent"] == stats[1]["bytes_sent"] == \
        6 * sync[2]["grad_all_reduce_bytes_per_step"][0]          # every parameter, 6 steps


def _deepspeed_run(tmp_path, name, data_args, *extra, launcher="torchrun"):
    run_dir = str(tmp_path / name)
    launch(["-m", "megatron_asyncmesh.train_deepspeed", "--config",
            os.path.join(REPO, "launch", "configs", "tiny.yaml"), "--run-dir", run_dir,
            "--no-progress", *SGD, *extra, *data_args], nproc=2, launcher=launcher,
           timeout=240)
    return _losses(run_dir)


def test_decoupled_lr_is_one_schedule_in_both_engines(tmp_path, data_args, megatron_sync):
    """--decoupled-lr / --decoupled-min-lr (the input embedding's and output layer's own
    schedule, decaying from step 1): Megatron's param-group override under its
    OptimizerParamScheduler and the DeepSpeed engine's groups under LambdaLR train the
    same run step by step, and that run is not the one without the flags."""
    flags = ["--decoupled-lr", "0.2", "--decoupled-min-lr", "0.02", "--lr-warmup-iters", "1"]
    megatron_dir = str(tmp_path / "megatron")
    train(megatron_dir, nproc=2, args=[*SGD, *flags, *data_args])
    megatron = _losses(megatron_dir)
    deepspeed = _deepspeed_run(tmp_path, "zero0", data_args, *flags, "--zero-stage", "0")
    _close(megatron, deepspeed)
    assert max(abs(x - y) for x, y in zip(megatron[0], megatron_sync[0])) > 1e-3


def test_zero3_baseline_is_megatron_data_parallel(tmp_path, data_args, megatron_sync):
    """The ZeRO baseline trains the same GPT on the same samples: DeepSpeed ZeRO-3
    (deepspeed.initialize, its own partitioning) matches Megatron's DDP step by step;
    the comms logger saw ZeRO-3's reduce-scatter and all-gather. The run stops after 3
    of 6 steps (--save) and resumes (--load: engine.load_checkpoint restores the
    partitioned parameters, SGD momentum and schedule): both halves together are the
    DDP run that never stopped. A resume with another ZeRO stage, model or length is
    refused before DeepSpeed reads. The final checkpoint, consolidated by DeepSpeed's
    zero_to_fp32 and exported to Hugging Face (GPT-2 style), has the validation loss
    the run measured."""
    from megatron_asyncmesh.config import ConfigError, parse_config
    from megatron_asyncmesh.checkpoint.deepspeed import DS_CONFIG, check_zero_resume, saved_steps

    ckpt, hf = str(tmp_path / "zero3_ckpt"), str(tmp_path / "zero3_hf")
    zero3 = ["--zero-stage", "3", "--lr-decay-iters", "6"]   # the 6-step schedule in both
    _deepspeed_run(tmp_path, "zero3", data_args, *zero3, "--train-iters", "3", "--save", ckpt)
    resumed = _deepspeed_run(tmp_path, "zero3", data_args, *zero3, "--load", ckpt,
                             "--save", ckpt, "--save-keep-last", "1")
    _close(megatron_sync, resumed)          # one metrics file: steps 1-3, then 4-6
    s = resumed[2]
    assert s["start_iteration"] == 3 and saved_steps(ckpt) == [6]   # keep-last: step 3 gone
    # One schema for both engines: summary.json's keys, and the keys of every kind of
    # metrics.jsonl line (training, evaluation, checkpoint).
    from megatron_asyncmesh.metrics import CHECKPOINT_KEYS, EVAL_KEYS, SUMMARY_KEYS, TRAIN_KEYS

    def line_kinds(run_dir):
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            return {frozenset(json.loads(line)) for line in f}

    schemas = {frozenset(TRAIN_KEYS), frozenset(EVAL_KEYS), frozenset(CHECKPOINT_KEYS)}
    assert line_kinds(resumed[3]) == schemas
    assert line_kinds(megatron_sync[3]) == schemas - {frozenset(CHECKPOINT_KEYS)}
    assert set(s) == set(megatron_sync[2]) == set(SUMMARY_KEYS)
    assert (s["engine"], megatron_sync[2]["engine"]) == ("deepspeed", "megatron")
    ops, params = s["per_rank"][0]["comm_bytes_by_op"], s["parameters"]
    assert ops["reduce_scatter_tensor"] >= 3 * 4 * params * 0.99     # every step's gradients

    with open(os.path.join(ckpt, DS_CONFIG)) as f:
        padded = json.load(f)["padded_vocab_size"]

    def check(*flags, stage=3):
        cfg = parse_config(["--config", os.path.join(REPO, "launch", "configs", "tiny.yaml"),
                            *SGD, *flags, "--load", ckpt])
        return check_zero_resume(cfg, stage, padded, 2)

    with pytest.raises(ConfigError, match="--zero-stage 3 on 2 data-parallel ranks"):
        check("--train-iters", "9", stage=1)
    with pytest.raises(ConfigError, match="hidden_size saved 64 vs now 128"):
        check("--hidden-size", "128", "--train-iters", "9")
    with pytest.raises(ConfigError, match="at iteration 6, not before --train-iters 6"):
        check()
    assert check("--train-iters", "9") == 6

    tool("convert_checkpoint.py", "zero-export", "--input", ckpt, "--output", hf)
    with open(os.path.join(hf, "config.json")) as f:
        config = json.load(f)
    assert config["model_type"] == "gpt2" and config["tie_word_embeddings"] is True
    assert evaluate("--hf", hf)["val_loss"] == pytest.approx(s["final_val_loss"], abs=1e-5)


def test_deepspeed_engine_with_sparse_averaging_hook(tmp_path, data_args, megatron_sync):
    """AsyncMesh plugged into a DeepSpeed engine (ZeRO-0, backward all-reduce off,
    averaging after engine.step()): dense averaging equals Megatron's synchronous
    DP; the engine sent only the averaging's all-reduces."""
    dense = _deepspeed_run(tmp_path, "ds_dense", data_args, "--zero-stage", "0", *DENSE)
    _close(megatron_sync, dense)
    s = dense[2]
    stats = s["dp_averaging_stats"][0]
    assert stats["bytes_per_step"] == 4 * s["parameters"]
    rank0 = s["per_rank"][0]["comm_bytes_by_op"]
    # 6 steps of averaging plus DeepSpeed's one-off broadcast of the initial weights.
    assert rank0["all_reduce"] == 6 * 4 * s["parameters"] == stats["bytes_sent"]


def test_sparse_averaging_refuses_zero2(capsys):
    from megatron_asyncmesh import train_deepspeed

    assert train_deepspeed.main(["--zero-stage", "2", "--dp-averaging", "sparse"]) == 2
    err = capsys.readouterr().err
    assert "cannot be combined with --zero-stage 2" in err and "--zero-stage 0 or 1" in err

