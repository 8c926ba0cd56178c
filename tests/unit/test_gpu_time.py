"""The GPU-time split of a profiled window: interval unions over streams, and exposed communication."""

from types import SimpleNamespace

import pytest
from torch.autograd import DeviceType

from titan_dsv3.metrics.gpu_time import gpu_time, length_outside, union


def _event(name, start, end, device=DeviceType.CUDA, annotation=False):
    return SimpleNamespace(
        name=name,
        time_range=SimpleNamespace(start=start, end=end),
        device_type=device,
        is_user_annotation=annotation,
    )


def test_union_and_outside():
    assert union([(5, 7), (0, 2), (1, 3), (7, 8)]) == [(0, 3), (5, 8)]
    assert length_outside([(0, 10)], [(2, 3), (5, 6), (9, 12)]) == pytest.approx(7)
    assert length_outside([(0, 4), (6, 10)], [(3, 7)]) == pytest.approx(6)  # one b interval spans two a ones
    assert length_outside([(0, 1)], []) == 1 and length_outside([], [(0, 1)]) == 0


def test_split_of_a_window():
    events = [
        _event("gemm", 0, 40),  # compute stream
        _event("ncclDevKernel_SendRecv(x)", 30, 60),  # all-to-all: 10 hidden under the gemm, 20 exposed...
        _event("elementwise", 50, 55),  # ...minus 5 under this kernel: 15 exposed
        _event("ncclDevKernel_AllGather_RING_LL(y)", 70, 80),  # all exposed; 60..70 is idle
        _event("nccl:all_to_all", 30, 60, annotation=True),  # annotations are not kernels
        _event("aten::mm", 0, 100, device=DeviceType.CPU),  # host events are not kernels
    ]
    t = gpu_time(events)
    assert (t.window, t.busy) == (80, 70)
    assert (t.comm, t.comm_exposed) == (40, 25)
    assert (t.a2a, t.a2a_exposed) == (30, 15)
    assert "all-to-all" in t.summary(steps=2)


def test_no_device_kernels_gives_none():
    assert gpu_time([_event("aten::mm", 0, 1, device=DeviceType.CPU)]) is None
