"""The CPU compatibility layer: what it redirects, and that a GPU disables it."""

import subprocess
import sys
import textwrap

import torch

import megatron_asyncmesh  # noqa: F401  (activates the layer)
from megatron_asyncmesh import cpu_compat
from tests.harness import REPO, env_for_ranks


def test_active_on_cpu_and_lists_what_it_patched():
    assert not torch.cuda.is_available()
    assert cpu_compat.is_active()
    names = set(cpu_compat.patched_names())
    for expected in ("torch.cuda.current_device", "torch.zeros", "torch.Tensor.cuda",
                     "torch.cuda.get_rng_state", "torch.Tensor.type"):
        assert expected in names


def test_cuda_allocations_land_on_cpu():
    assert torch.zeros(3, device="cuda").device.type == "cpu"
    assert torch.empty(2, device=torch.cuda.current_device()).device.type == "cpu"
    assert torch.tensor([1.0], device=torch.device("cuda", 0)).device.type == "cpu"
    x = torch.ones(2)
    assert x.cuda() is x
    y = x.to("cuda", dtype=torch.float64)
    assert y.device.type == "cpu" and y.dtype == torch.float64  # dtype change is kept
    assert x.new_zeros(2, device="cuda").device.type == "cpu"
    # A real CPU request is untouched.
    assert torch.zeros(1, device="cpu").device.type == "cpu"


def test_device_contexts_still_apply_to_wrapped_factories():
    """``with torch.device('meta')`` (transformers builds models this way) must still
    place factory calls: the layer wraps torch.empty & co."""
    with torch.device("meta"):
        made = [torch.empty(3), torch.arange(4), torch.zeros(2, 2), torch.randn(2)]
    assert all(t.device.type == "meta" for t in made)
    with torch.device("meta"):
        assert torch.empty(2, device="cuda").device.type == "cpu"   # explicit device wins


def test_cuda_rng_is_a_separate_cpu_generator():
    torch.cuda.manual_seed(7)
    state = torch.cuda.get_rng_state()
    cpu_before = torch.get_rng_state()
    first = torch.randn(4, generator=cpu_compat.fake_cuda_generator())
    torch.cuda.set_rng_state(state)
    again = torch.randn(4, generator=cpu_compat.fake_cuda_generator())
    assert torch.equal(first, again)
    assert torch.equal(cpu_before, torch.get_rng_state())  # CPU stream untouched


def test_megatron_rng_tracker_fork_restores_state():
    from megatron.core.tensor_parallel import random as mrandom

    tracker = mrandom.CudaRNGStatesTracker()
    tracker.add("model-parallel-rng", 1234)
    before = torch.cuda.get_rng_state()
    with tracker.fork("model-parallel-rng"):
        inside = torch.cuda.get_rng_state()
    assert not torch.equal(before, inside)
    assert torch.equal(before, torch.cuda.get_rng_state())


def test_type_names_are_cuda_only_for_megatron_callers():
    x = torch.zeros(1)
    assert x.type() == "torch.FloatTensor"
    namespace = {"__name__": "megatron.core.optimizer.fake"}
    exec("def f(t):\n    return t.type()\n", namespace)
    assert namespace["f"](x) == "torch.cuda.FloatTensor"


def test_gpu_machine_leaves_torch_alone():
    """With CUDA reported available the layer must not patch anything."""
    code = textwrap.dedent("""
        import torch
        original = torch.zeros
        torch.cuda.is_available = lambda: True
        import megatron_asyncmesh
        from megatron_asyncmesh import cpu_compat
        assert not cpu_compat.is_active()
        assert cpu_compat.patched_names() == ()
        assert torch.zeros is original
        print("untouched")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env_for_ranks(), cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "untouched" in out.stdout


def test_causal_attention_without_explicit_mask():
    """The local layer spec with attention_mask=None must still be causal:
    changing a future token cannot change the logits of earlier positions. In the same
    process: the configuration of a CUDA machine without Transformer Engine or apex
    builds (bf16 model in Float16Module, DDP, Megatron's mixed-precision optimizer)."""
    code = textwrap.dedent("""
        import torch, torch.distributed as dist
        import megatron_asyncmesh
        from megatron_asyncmesh.config import TrainConfig
        from megatron_asyncmesh import distributed as mdist
        from megatron_asyncmesh.model import build_gpt_stage, init_layout_independent
        cfg = TrainConfig(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16)
        mdist.init_distributed(); mdist.init_model_parallel(cfg)
        model = build_gpt_stage(cfg, 256); init_layout_independent(model, cfg); model.eval()
        tokens = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(0))
        pos = torch.arange(16).unsqueeze(0)
        a = model(tokens, pos, None)
        tokens[0, 10] = (tokens[0, 10] + 1) % 256
        b = model(tokens, pos, None)
        assert torch.equal(a[:, :10], b[:, :10]), "future token leaked into the past"
        assert not torch.equal(a[:, 10:], b[:, 10:])
        print("causal")

        # The model and optimizer configuration of a CUDA machine built from
        # requirements.txt (no Transformer Engine, no apex, no compiled softmax): every
        # fusion flag is one whose kernel exists there, and the model builds.
        from megatron.core.models.gpt import GPTModel
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron_asyncmesh.dataparallel.megatron import wrap_ddp
        from megatron_asyncmesh.model import layer_spec, mixed_precision, transformer_config
        gpu = TrainConfig(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16,
                          bf16=True, transformer_impl="local")
        tc = transformer_config(gpu, on_gpu=True, kernels={}, transformer_impl="local")
        assert tc.bias_dropout_fusion and tc.bias_activation_fusion
        assert not (tc.persist_layer_norm or tc.masked_softmax_fusion
                    or tc.gradient_accumulation_fusion)
        gpt = GPTModel(config=tc, transformer_layer_spec=layer_spec(gpu), vocab_size=256,
                       max_sequence_length=16)
        ddp = wrap_ddp(gpu, mixed_precision(gpt, gpu))
        opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-3, bf16=True,
                                                     params_dtype=torch.bfloat16), [ddp])
        from megatron_asyncmesh.optim.main_params import leaf_optimizers
        leaves = [type(o).__name__ for o in leaf_optimizers(opt)]
        assert leaves == ["Float16OptimizerWithFloat16Params"], leaves
        # What the configuration used to be (persist_layer_norm whenever CUDA is there)
        # is what such a machine refused.
        tc.persist_layer_norm = True
        try:
            GPTModel(config=tc, transformer_layer_spec=layer_spec(gpu), vocab_size=256,
                     max_sequence_length=16)
        except AssertionError as exc:
            assert "persist_layer_norm" in str(exc), repr(exc)
        else:
            raise AssertionError("torch's LayerNorm accepted persist_layer_norm")
        mdist.shutdown()
        print("cuda configuration builds")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env_for_ranks(), cwd=REPO, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "causal" in out.stdout and "cuda configuration builds" in out.stdout


def test_uneven_all_gather_on_gloo(tmp_path):
    """Megatron's layer-wise optimizer all-gathers each rank's whole tensors (uneven
    sizes), which gloo refuses; the layer pads and cuts back."""
    code = textwrap.dedent("""
        import os, torch, torch.distributed as dist
        import megatron_asyncmesh
        dist.init_process_group("gloo")
        r = dist.get_rank()
        mine = torch.arange(3 + 2 * r, dtype=torch.float32) + 10 * r
        out = [torch.empty(3), torch.empty(5)]
        dist.all_gather(out, mine)
        assert torch.equal(out[0], torch.arange(3.0)), out
        assert torch.equal(out[1], torch.arange(5.0) + 10), out
        same = [torch.empty(2), torch.empty(2)]
        dist.all_gather(same, torch.full((2,), float(r)))      # equal sizes: torch's own
        assert [t.tolist() for t in same] == [[0.0, 0.0], [1.0, 1.0]]
        dist.destroy_process_group()
    """)
    from megatron_asyncmesh.distributed import free_port

    script = tmp_path / "gather.py"
    script.write_text(code)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                           "2", "--master_port", str(free_port()), str(script)],
                          env=env_for_ranks(), cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
