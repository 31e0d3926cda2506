"""How bytes move: process-group broadcast (gloo on CPU, NCCL between GPUs) and CUDA IPC.

``packing`` is pure; ``broadcast`` and ``ipc`` hold the two transports. Both carry the same
``TransferPlan`` of flat buckets, so the engine side applies weights the same way either way.
"""
