#!/usr/bin/env python
"""Validation loss / perplexity of a checkpoint, project or Hugging Face format.

    python tools/evaluate.py --checkpoint runs/a/ckpt            # any pipeline size
    python tools/evaluate.py --hf runs/a/hf                       # exported or any GPT-2/Llama
    python tools/evaluate.py --hf gpt2-dir --data-path DATA --tokenizer-model TOK.model

The samples are the training run's validation samples (its data, seed, split,
sequence length, eval iterations and global batch; flags override them), so
numbers compare across formats and with the run's own ``val_loss``. Prints one
JSON line (``--out FILE`` writes it too).
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import megatron_asyncmesh  # noqa: E402,F401  (CPU compatibility layer before Megatron)
from megatron_asyncmesh.checkpoint.integrity import CheckpointError  # noqa: E402
from megatron_asyncmesh.config import ConfigError  # noqa: E402
from megatron_asyncmesh.data.indexed import DatasetError  # noqa: E402
from megatron_asyncmesh.evaluate import evaluate  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help="a project checkpoint (--save dir or iter dir)")
    parser.add_argument("--hf", help="a Hugging Face model directory")
    parser.add_argument("--replica", type=lambda v: v if v == "mean" else int(v),
                        help="replica of a sparse-DP checkpoint (0..DP-1, or 'mean')")
    parser.add_argument("--data-path")
    parser.add_argument("--tokenizer-model")
    parser.add_argument("--seq-length", type=int)
    parser.add_argument("--eval-iters", type=int)
    parser.add_argument("--global-batch-size", type=int)
    parser.add_argument("--micro-batch-size", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--split")
    parser.add_argument("--logits-out", help="save the first microbatch's logits (torch.save)")
    parser.add_argument("--out", help="also write the result JSON here")
    args = parser.parse_args(argv)
    overrides = {k: getattr(args, k) for k in ("data_path", "tokenizer_model", "seq_length",
                                               "eval_iters", "global_batch_size",
                                               "micro_batch_size", "seed", "split")}
    try:
        result = evaluate(args.checkpoint, args.hf, overrides, args.replica, args.logits_out)
    except (ConfigError, CheckpointError, DatasetError) as exc:
        print(f"evaluate: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
