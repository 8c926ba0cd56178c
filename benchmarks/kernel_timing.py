"""Timing helpers of benchmarks/bench_kernels.py: a row's device time by events and by CUDA-graph replay, its
host time, and the per-kernel and per-function splits behind it."""

from __future__ import annotations

import cProfile
import pstats
import time

import torch
from triton.testing import do_bench, do_bench_cudagraph

ROWS: list[dict] = []
# Rows also timed by CUDA-graph replay (bench_kernels --no-graphs turns it off).
GRAPHS = True


def bench(fn) -> float:
    """Median ms of fn (CUDA events, after warm-up)."""
    return do_bench(fn, warmup=50, rep=300, return_mode="median")


def graph_ms(fn) -> float:
    """Median ms of fn replayed from a CUDA graph: the device's time alone, no host work between kernels. An
    isolated eager call waits on its host when that work exceeds the GPU's (stop 26: 1.3-2.1 ms of host work a
    B2 H16 S4096 MLA call, by machine, against 1.5 ms of kernels); a training step mostly hides it."""
    return do_bench_cudagraph(fn, rep=200, return_mode="median")


def host_ms(fn, calls: int = 20) -> float:
    """Host ms a call: `calls` back to back without a sync (the launch queue takes a few hundred kernels)."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - t0) / calls * 1e3
    torch.cuda.synchronize()
    return host


def interleaved(fns: dict, windows: int, calls: int = 10) -> dict[str, list[float]]:
    """ms a call of each thunk, timed in turn in `windows` windows of `calls` back-to-back calls (CUDA events).
    Under a sustained GEMM load an H200 sits at its 700 W cap and its SM clock wanders between 1.47 and 1.98 GHz
    over seconds (nvidia-smi, stop 24): two thunks timed 300 ms apart by `bench` saw ratios of 1.21-1.40x. Taken
    in turn, each ~0.1 s window of one thunk sits next to one of the other."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()
    for _ in range(windows):
        for k, fn in fns.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(calls):
                fn()
            end.record()
            end.synchronize()
            times[k].append(start.elapsed_time(end) / calls)
    return times


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def report(name: str, fn, flops: float, err: str = "") -> float:
    """Time fn (a thunk) and print a row: ms by events (what an isolated call takes), by graph replay (device
    time alone), host ms a call. A failure prints and returns nan (the other rows still run)."""
    try:
        ms = bench(fn)
        host = host_ms(fn)
    except Exception as e:  # noqa: BLE001
        print(f"{name:58s} FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
        return float("nan")
    graph = float("nan")
    if GRAPHS:
        try:
            graph = graph_ms(fn)
        except Exception as e:  # noqa: BLE001  (a host sync inside fn cannot be captured)
            print(f"  (graph replay of {name} failed: {type(e).__name__}: {str(e)[:120]})", flush=True)
    row = {"name": name, "ms": round(ms, 4), "graph_ms": round(graph, 4), "host_ms": round(host, 4)}
    row |= {"tflops": round(flops / ms / 1e9, 1), "err": err}
    ROWS.append(row)
    print(f"{name:58s} {ms:9.3f} ms (graph {graph:7.3f}, host {host:6.3f}) {row['tflops']:7.1f} TFLOP/s  {err}",
          flush=True)  # fmt: skip
    return ms


def autotune_picks(*kernels) -> None:
    for k in kernels:
        timings = getattr(k, "configs_timings", None) or {}
        ranked = sorted(((v[0] if isinstance(v, list) else v, str(c)) for c, v in timings.items()))
        name = getattr(k.fn, "__name__", str(k.fn))
        best = getattr(k, "best_config", None)
        if best is None:  # the kernel never ran (on Hopper Gluon kernels replace it)
            print(f"  {name}: not run")
            continue
        print(f"  {name}: best {best}; " + "; ".join(f"{c} {t:.3f}" for t, c in ranked[:6]))


def profile_split(fn, steps: int = 3) -> None:
    """Device time per kernel name over `steps` calls of fn."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    rows = [
        (e.device_time_total / steps / 1e3, e.key) for e in prof.key_averages() if e.device_time_total > 0
    ]
    for ms, key in sorted(rows, reverse=True)[:14]:
        print(f"    {ms:8.3f} ms  {key[:90]}")


def host_split(fn, calls: int = 30, top: int = 16) -> None:
    """Where a call's host time goes: cProfile over `calls` calls, the functions by their own time (ms a call).
    A lead, not a measurement: cProfile's hooks slow Python code about 1.5-2x, and on a compiled chain it put
    1.3 ms of "own time" in torch's custom-op `backend_impl`, where timing the op against its launcher directly
    found 0.02-0.03 ms (benchmarks/RESULTS.md, stop 27). Time a suspect directly before acting on it."""
    fn()
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    torch.cuda.synchronize()
    stats = pstats.Stats(prof).stats  # {(file, line, name): (calls, prim, own, cumulative, callers)}
    rows = sorted(((v[2] / calls * 1e3, v[3] / calls * 1e3, k) for k, v in stats.items()), reverse=True)
    total = sum(r[0] for r in rows)
    print(f"    host profile: {total:.3f} ms a call under cProfile; own / cumulative ms, function")
    for own, cum, (path, line, func) in rows[:top]:
        print(f"    {own:7.3f} {cum:7.3f}  {func} ({path.rsplit('/', 2)[-1]}:{line})")
