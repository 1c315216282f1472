"""Optimizers against gradient staleness, inside Megatron-core's optimizer stack.

``builder`` makes a stage's optimizer through Megatron's ``get_megatron_optimizer`` (its
registry, wrappers and parameter groups); ``stage_local`` keeps its gradient statistics
inside the pipeline stage; ``main_params`` finds the fp32 main parameters of a
mixed-precision optimizer; ``nadamw``, ``soap`` and ``feedback`` are the methods;
``config`` holds the options and which combinations can run. (Nothing is imported here:
the configuration is read by every process, the optimizers only where they are built.)
"""
