"""Test-side helpers shared by the adapter tests (``guards``: the no-host-sync guard for moewatch's hooks).

There are no framework replicas any more: Megatron-Core, DeepSpeed, torchtitan and MegaBlocks are installed
as pinned test-only packages (requirements-frameworks.txt) and their real classes are built in
``tests/test_real_*.py``, with the CPU shims of ``tests/realfw.py``.
"""
