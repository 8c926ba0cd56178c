"""Where the GPU time of a profiled window goes: busy vs idle, communication, and the all-to-all time that no
compute kernel hides.

A step is host-bound when the GPU idles between kernels, and communication costs only what overlaps no compute.
Per-op tables show neither: they sum kernel times per name, count overlapping streams twice and leave gaps out.
This module takes the device kernels of a torch.profiler run and measures interval unions over all streams:

  window     first kernel start .. last kernel end
  busy       union of all kernels (any stream)
  comm       union of NCCL kernels;   a2a: union of the NCCL send/recv kernels (all-to-all; with pipeline
             parallelism the stage send/recv count here too)
  exposed    the part of comm / a2a that overlaps no compute (non-NCCL) kernel

Used by the trainer's [profiling] traces and by benchmarks/bench_train.py --profile.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.autograd import DeviceType

Intervals = list[tuple[float, float]]


def union(intervals: Intervals) -> Intervals:
    """Sorted, disjoint intervals covering the same points."""
    out: list[list[float]] = []
    for start, end in sorted(intervals):
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return [(s, e) for s, e in out]


def length(intervals: Intervals) -> float:
    """Measure of a union (disjoint intervals)."""
    return sum(e - s for s, e in intervals)


def length_outside(a: Intervals, b: Intervals) -> float:
    """Measure of union(a) minus union(b)."""
    a, b = union(a), union(b)
    total, j = 0.0, 0
    for start, end in a:
        while j < len(b) and b[j][1] <= start:
            j += 1
        cur, k = start, j
        while k < len(b) and b[k][0] < end:
            total += max(0.0, b[k][0] - cur)
            cur = max(cur, b[k][1])
            k += 1
        total += max(0.0, end - cur)
    return total


@dataclass
class GpuTime:
    """Microseconds in one profiled window (see the module docstring)."""

    window: float
    busy: float
    comm: float
    comm_exposed: float
    a2a: float
    a2a_exposed: float

    def summary(self, steps: int = 1) -> str:
        per = 1e3 * steps
        pct = 100.0 / self.window if self.window else 0.0
        return (
            f"GPU busy {self.busy / per:.1f} of {self.window / per:.1f} ms a step ({self.busy * pct:.0f}%); "
            f"communication {self.comm / per:.1f} ms ({self.comm_exposed / per:.1f} exposed), "
            f"all-to-all {self.a2a / per:.1f} ms ({self.a2a * pct:.1f}% of the window, "
            f"{self.a2a_exposed / per:.1f} ms exposed)"
        )


def _is_kernel(event) -> bool:
    return event.device_type == DeviceType.CUDA and not getattr(event, "is_user_annotation", False)


def gpu_time(events) -> GpuTime | None:
    """GpuTime of the profiler's events (prof.events()); None when there are no device kernels (CPU runs)."""
    kernels = [(e.time_range.start, e.time_range.end, e.name) for e in events if _is_kernel(e)]
    if not kernels:
        return None
    comm = [(s, e) for s, e, name in kernels if name.startswith("nccl")]
    a2a = [(s, e) for s, e, name in kernels if name.startswith("nccl") and "SendRecv" in name]
    compute = [(s, e) for s, e, name in kernels if not name.startswith("nccl")]
    window = max(e for _, e, _ in kernels) - min(s for s, _, _ in kernels)
    return GpuTime(
        window=window,
        busy=length(union([(s, e) for s, e, _ in kernels])),
        comm=length(union(comm)),
        comm_exposed=length_outside(comm, compute),
        a2a=length(union(a2a)),
        a2a_exposed=length_outside(a2a, compute),
    )
