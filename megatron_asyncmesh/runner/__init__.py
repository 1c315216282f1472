"""The run around the step (``loop``: set-up, evaluation points, drains, timing, metrics,
the summary, plots and the final table), shared by the two engines that take the steps:
Megatron-core (``megatron``) and DeepSpeed (``deepspeed``); the run's options
(``config``)."""
