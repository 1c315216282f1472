#!/usr/bin/env python
"""Cost of one optimizer step per method, relative to AdamW, on a real Megatron-core GPT.

Builds the model of a config (default ``launch/configs/gpt-125m.yaml``, fp32 on CPU,
bf16 on a GPU as the config says) as one process (PP = DP = 1), gives every
parameter a fixed random gradient, and times ``optimizer.step()`` of the Megatron
optimizer ``megatron_asyncmesh.optim.builder.build_optimizer`` returns for each method:
Megatron's AdamW, nadamw, Muon, SOAP on a refresh step (power iteration + QR of
every Kronecker factor) and on a step without refresh, and AdamW + error
feedback. SOAP with the default period 10 costs (refresh + 9 x no-refresh) / 10,
also reported. Each method is bracketed by AdamW timings; reported as median ms
and the ratio to the neighbouring AdamW.

    python tools/bench_optimizer_step.py --out runs/bench_optimizer_step
    python tools/bench_optimizer_step.py --config launch/configs/tiny.yaml --rounds 3 --out /tmp/s

Writes results.json and results.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

METHODS = {
    "adamw": {"optimizer": "adam"},
    "nadamw": {"optimizer": "nadamw"},
    "muon": {"optimizer": "muon"},
    "soap (refresh every step)": {"optimizer": "soap", "soap_precondition_frequency": 1},
    # the same SOAP, timed on, with its period set past the run: steps without a refresh
    "soap (no refresh)": None,
    "adamw + error feedback": {"optimizer": "adam", "delay_error_feedback": 0.5},
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=os.path.join(REPO, "launch", "configs", "gpt-125m.yaml"))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=3, help="timed steps per method per round")
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--out", default="runs/bench_optimizer_step")
    a = p.parse_args(argv)

    import megatron_asyncmesh  # noqa: F401
    import torch
    from megatron.core import parallel_state

    from megatron_asyncmesh import distributed as mdist
    from megatron_asyncmesh.optim import builder as optim
    from megatron_asyncmesh.config import parse_config
    from megatron_asyncmesh.dataparallel.megatron import wrap_ddp
    from megatron_asyncmesh.model import build_gpt_stage, init_layout_independent

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(mdist.free_port()))
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    cuda = torch.cuda.is_available()
    base = ["--config", a.config, "--train-iters", "10", "--lr-warmup-iters", "0"]
    if not cuda:
        base += ["--bf16", "false"]
    cfg = parse_config(base)
    mdist.init_distributed()
    mdist.init_model_parallel(cfg)
    model = build_gpt_stage(cfg, a.vocab)
    init_layout_independent(model, cfg)
    model = wrap_ddp(cfg, model)
    n_params = sum(q.numel() for q in model.parameters())
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(q.shape, generator=gen).mul_(1e-3).to(q.device) for q in
             model.parameters()]

    def one_step(opt):
        for q, g in zip(model.parameters(), grads):
            q.main_grad.copy_(g)
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        opt.step()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    def build(overrides):
        c = parse_config(base)
        for k, v in overrides.items():
            setattr(c, k, v)
        c.pipeline_schedule = "2bw"          # a delay of 1, so error feedback is active
        opt, info = optim.build_optimizer(c, model, 0, 1, 1)
        return optim.wrap_error_feedback(opt, model, c, info)

    # One method at a time (a 125M model's SOAP state alone is several GB), each with
    # a warm-up step (state allocation; SOAP's first basis is a full eigh), then
    # ``steps`` timed steps. AdamW is timed again after every method and each method's
    # ratio uses the mean of the AdamW timings around it, so drift of the machine
    # cancels to first order.
    times = {name: [] for name in METHODS}
    ratios = {name: [] for name in METHODS}
    adam_runs = []

    def time_method(name):
        opt = build(METHODS[name])
        one_step(opt)
        out = [one_step(opt) for _ in range(a.steps)]
        if name.startswith("soap"):
            # SOAP's warm-up step is a full eigh of every Kronecker factor (minutes for
            # a 125M model on a CPU): time the steps without a refresh on the same state.
            from megatron_asyncmesh.optim.soap import _soap_optimizers

            for soap, _ in _soap_optimizers(opt):
                soap.precondition_frequency = 10 ** 9
            no_refresh = [one_step(opt) for _ in range(a.steps)]
            del opt
            return statistics.median(out), statistics.median(no_refresh)
        del opt
        return statistics.median(out)

    for rnd in range(a.rounds):
        adam_runs.append(time_method("adamw"))
        for name in METHODS:
            if name == "adamw" or METHODS[name] is None:
                continue
            t = time_method(name)
            adam_runs.append(time_method("adamw"))
            timed = {name: t}
            if isinstance(t, tuple):
                timed = {name: t[0], "soap (no refresh)": t[1]}
            for n, t in timed.items():
                times[n].append(t)
                ratios[n].append(t / statistics.mean(adam_runs[-2:]))
                print(f"round {rnd}: {n} {1000 * t:.0f} ms, AdamW {1000 * adam_runs[-1]:.0f} ms",
                      flush=True)
    times["adamw"] = adam_runs
    ratios["adamw"] = [1.0]

    device = torch.cuda.get_device_name() if cuda else f"CPU ({torch.get_num_threads()} threads)"
    rows = {name: {"median_ms": 1000 * statistics.median(times[name]),
                   "ratio_to_adamw": statistics.median(ratios[name])} for name in METHODS}
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump({"config": a.config, "parameters": n_params, "device": device,
                   "rounds": a.rounds, "steps_per_round": a.steps, "methods": rows}, f, indent=1)
    lines = [f"# One optimizer step, {os.path.basename(a.config)} ({n_params / 1e6:.0f} M "
             f"parameters), {device}", "", "| method | median ms | ratio to AdamW |",
             "|---|---|---|"]
    lines += [f"| {n} | {r['median_ms']:.0f} | {r['ratio_to_adamw']:.2f} |" for n, r in rows.items()]
    every, plain = rows["soap (refresh every step)"], rows["soap (no refresh)"]
    amortized = (every["ratio_to_adamw"] + 9 * plain["ratio_to_adamw"]) / 10
    lines.append(f"| soap, period 10 (amortized) | "
                 f"{(every['median_ms'] + 9 * plain['median_ms']) / 10:.0f} | {amortized:.2f} |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(a.out, "results.md"), "w") as f:
        f.write(text)
    print(text)
    parallel_state.destroy_model_parallel()
    return 0


if __name__ == "__main__":
    sys.exit(main())
