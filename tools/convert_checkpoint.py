#!/usr/bin/env python
"""Convert megatron-asyncmesh checkpoints.

    # pipeline size P -> P' and / or tensor-parallel size T -> T' (to 1 included),
    # model + optimizer + LR schedule + iteration
    python tools/convert_checkpoint.py reshard --input runs/a/ckpt --output runs/a/ckpt_pp2 \\
        [--pipeline-model-parallel-size 2] [--tensor-model-parallel-size 1] [--drop-async-state]

    # to Hugging Face (GPT-2 or Llama style, from the model config), any pipeline size
    python tools/convert_checkpoint.py hf-export --input runs/a/ckpt --output runs/a/hf [--replica R]

    # from Hugging Face (GPT-2 / Llama): a weights-only checkpoint --load continues from
    python tools/convert_checkpoint.py hf-import --input runs/a/hf --output runs/b/ckpt

    # a DeepSpeed ZeRO 0-3 checkpoint (train_deepspeed --save) to Hugging Face
    python tools/convert_checkpoint.py zero-export --input runs/z/ckpt --output runs/z/hf

Inputs are verified (metadata, format version, every file's SHA-256) before a
byte is read; outputs are written into ``OUTPUT.partial`` and renamed when
complete. Exit status 2 with the reason on bad input.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import megatron_asyncmesh  # noqa: E402,F401  (CPU compatibility layer before Megatron)
from megatron_asyncmesh.checkpoint import convert  # noqa: E402
from megatron_asyncmesh.checkpoint.integrity import CheckpointError  # noqa: E402
from megatron_asyncmesh.config import ConfigError  # noqa: E402


def _replica(value: str):
    return value if value == "mean" else int(value)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (("reshard", "change the pipeline and / or tensor-parallel size"),
                       ("hf-export", "project checkpoint -> Hugging Face"),
                       ("hf-import", "Hugging Face -> project checkpoint (weights only)"),
                       ("zero-export", "DeepSpeed ZeRO checkpoint -> Hugging Face")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--input", required=True)
        p.add_argument("--output", required=True)
        p.add_argument("--overwrite", action="store_true", help="replace an existing output")
        if name == "reshard":
            p.add_argument("--pipeline-model-parallel-size", type=int, default=None,
                           help="new pipeline size (default: the checkpoint's)")
            p.add_argument("--tensor-model-parallel-size", type=int, default=None,
                           help="new tensor-parallel size (default: the checkpoint's)")
            p.add_argument("--drop-async-state", action="store_true",
                           help="write a flush checkpoint when the new layout needs weight "
                                "versions the input does not hold")
        if name == "hf-export":
            p.add_argument("--replica", type=_replica, default=None,
                           help="which replica of a --dp-averaging sparse checkpoint "
                                "(0..DP-1), or 'mean' for the replicas' mean")
    args = parser.parse_args(argv)
    try:
        if args.command == "reshard":
            for flag_name in ("pipeline_model_parallel_size", "tensor_model_parallel_size"):
                value = getattr(args, flag_name)
                if value is not None and value < 1:
                    raise ConfigError(f"--{flag_name.replace('_', '-')} must be >= 1, got "
                                      f"{value}.")
            convert.reshard(args.input, args.output, args.pipeline_model_parallel_size,
                            args.drop_async_state, args.overwrite,
                            tensor_size=args.tensor_model_parallel_size)
        elif args.command == "hf-export":
            convert.export_hf(args.input, args.output, args.replica, args.overwrite)
        elif args.command == "hf-import":
            convert.import_hf(args.input, args.output, overwrite=args.overwrite)
        else:
            convert.export_zero(args.input, args.output, args.overwrite)
    except (ConfigError, CheckpointError) as exc:
        print(f"convert_checkpoint: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
