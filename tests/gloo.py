"""Real multi-process gloo groups for the distributed tests, with a teardown that cannot abort a rank.

``spawn(fn, *args)`` starts ``world`` processes with ``torch.multiprocessing.spawn``; each joins one gloo group
on a free loopback port and runs ``fn(rank, *args)``. When ``fn`` returns, the ranks meet at a barrier (no rank
tears gloo down while another still talks to it), destroy the group, and leave with ``os._exit(0)``.

Why ``os._exit``: torch's gloo backend can abort a process during interpreter finalization, after
``destroy_process_group`` has returned, when the C++ side of a process group (its worker threads, pending work
holding tensors) is destroyed while Python is being torn down: "terminate called without an active
exception", SIGABRT (pytorch/pytorch#179291 describes the mechanism). Fresh-clone CI runs hit it twice, in two
different tests, with a barrier before the teardown; it is torch's, not moewatch's. Skipping finalization
removes the window in which it happens. The tests lose nothing: each rank writes its results to a file before it returns, and the test
asserts on those files. A rank whose ``fn`` raises still exits non-zero with its traceback (``spawn`` reports it).
"""

from __future__ import annotations

import datetime
import os
import socket
import sys
from collections.abc import Callable
from typing import Any

import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def spawn(fn: Callable[..., None], *args: Any, world: int = 2, timeout_s: float = 60) -> None:
    """Run ``fn(rank, *args)`` on ``world`` gloo ranks; ``timeout_s`` bounds any collective that would hang."""
    mp.spawn(_rank_main, args=(fn, world, free_port(), timeout_s, args), nprocs=world, join=True)


def _rank_main(rank: int, fn: Callable[..., None], world: int, port: int, timeout_s: float, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    timeout = datetime.timedelta(seconds=timeout_s)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timeout)
    try:
        fn(rank, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
