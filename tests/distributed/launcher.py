"""A fork-based launcher for gloo tests: torch is imported once in the parent, each rank is a forked child.

A torchrun launch costs ~4-6 s of start-up on 2 cores; forking costs ~0.1 s (../../shared/CPU_TESTING.md).
Children run with one thread each, put their result (or traceback) on a queue and flush it before exiting, and
pass a barrier before destroy_process_group (gloo can abort a rank at teardown otherwise).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import socket
import traceback

import torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(rank: int, world_size: int, port: int, fn, args, queue) -> None:
    code = 0
    try:
        os.environ.update(
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(world_size),
            LOCAL_WORLD_SIZE=str(world_size),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            OMP_NUM_THREADS="1",
        )
        torch.set_num_threads(1)
        # plain pickle: tensors by value (torch's queue reducers would pass file descriptors, gone once we exit)
        result = pickle.dumps(fn(*args))
        queue.put((rank, True, result))
    except BaseException:
        queue.put((rank, False, traceback.format_exc()))
        code = 1
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            try:
                if code == 0:
                    dist.barrier()
                dist.destroy_process_group()
            except Exception:
                pass
        queue.close()
        queue.join_thread()
        os._exit(code)


def run_ranks(fn, world_size: int, *args, timeout: float = 300.0) -> list:
    """Run fn(*args) in world_size forked ranks (env:// rendezvous on localhost); return the results by rank."""
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_child, args=(r, world_size, port, fn, args, queue)) for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, object] = {}
    failed = True
    try:
        for _ in range(world_size):
            rank, ok, value = queue.get(timeout=timeout)
            if not ok:
                raise RuntimeError(f"rank {rank} of {world_size} failed:\n{value}")
            results[rank] = pickle.loads(value)
        failed = False
    finally:
        for p in procs:
            p.join(
                timeout=1 if failed else 30
            )  # after a failure the other ranks may wait in a collective forever
            if p.is_alive():
                p.kill()
                p.join()
    return [results[r] for r in range(world_size)]
