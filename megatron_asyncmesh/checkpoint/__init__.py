"""Checkpoints: integrity and sealing (``integrity``), the training state saved and loaded
through Megatron-core's ``dist_checkpointing`` (``state``), conversion between pipeline
layouts, Hugging Face and DeepSpeed (``convert``, ``hf``, ``deepspeed``), and the options
(``config``)."""
