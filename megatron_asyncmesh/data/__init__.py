"""Data: the bundled corpus, tokenizers, Megatron indexed datasets and loaders."""
