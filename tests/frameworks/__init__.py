"""Interface-faithful replicas of the MoE routers of training frameworks that cannot be installed here.

Megatron-Core, DeepSpeed, torchtitan and MegaBlocks ship CUDA-only builds or pull in heavy dependencies
(Transformer Engine, Apex, NCCL, custom kernels), so the adapter tests run against minimal re-implementations
of their router modules instead. Each keeps the upstream class name, the attribute names moewatch's
structural matchers look at, the forward signature and the outputs (shapes, dtypes, semantics), and drops
everything distributed. The upstream file each one follows is named in its module docstring.
"""
