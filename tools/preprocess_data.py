#!/usr/bin/env python
"""Raw text / JSON lines -> SentencePiece tokenizer -> Megatron .bin/.idx.

    python tools/preprocess_data.py                       # the bundled corpus
    python tools/preprocess_data.py --input docs.jsonl --output-prefix data/mine
    python tools/preprocess_data.py --input more.jsonl --output-prefix data/more \
        --tokenizer-model data/mine.tokenizer.model        # reuse a tokenizer

Prints the --data-path/--tokenizer-model flags to train on the result.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

from megatron_asyncmesh.data.preprocess import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
