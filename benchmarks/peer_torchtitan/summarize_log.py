"""Read torchtitan's per-step metric lines from a log and print tok/s/GPU, MFU and memory over the timed steps.

    python3 benchmarks/peer_torchtitan/summarize_log.py LOG [--warmup 5] [--tokens-per-step 16384] [--tb DIR]

torchtitan 0.2.2 logs, for each logged step on each rank:
    step: N  loss: L  grad_norm: G  memory: R GiB(P%)  tps: T  tflops: F  mfu: M%
where tps is tokens per second per GPU since the previous logged step (log_freq 1: that step alone), memory is the
peak *reserved* by the caching allocator during that step (not the peak allocated that our bench prints), and mfu
uses 989 TFLOP/s for an H200. A step that is a multiple of torchtitan's gc_freq (50) also runs gc.collect; the
summary adds the mean without it and with its extra time spread over gc_freq steps. With --tb, the peak *active*
bytes (closest to our peak allocated) are read from torchtitan's TensorBoard events (rank 0 only).
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
from pathlib import Path

LINE = re.compile(
    r"step:\s*(?P<step>\d+)\s+loss:\s*(?P<loss>[-\d.naif]+)\s+grad_norm:\s*(?P<gn>[-\d.naif]+)\s+"
    r"memory:\s*(?P<mem>[\d.]+)GiB\((?P<mempct>[\d.]+)%\)\s+tps:\s*(?P<tps>[\d,]+)\s+"
    r"tflops:\s*(?P<tflops>[\d,.]+)\s+mfu:\s*(?P<mfu>[\d.]+)%"
)
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def parse(log: Path) -> dict[int, dict]:
    rows: dict[int, dict] = {}
    for raw in log.read_text(errors="replace").splitlines():
        m = LINE.search(ANSI.sub("", raw))
        if m:  # with several ranks in one log, the first line for a step wins
            step = int(m["step"])
            rows.setdefault(
                step,
                {
                    "loss": float(m["loss"]),
                    "mem": float(m["mem"]),
                    "tps": float(m["tps"].replace(",", "")),
                    "tflops": float(m["tflops"].replace(",", "")),
                    "mfu": float(m["mfu"]),
                },
            )
    return rows


def tb_max_active(folder: Path) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[int, float] = {}
    for ev in sorted(folder.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(ev.parent))
        acc.Reload()
        if "memory/max_active(GiB)" in acc.Tags().get("scalars", []):
            for s in acc.Scalars("memory/max_active(GiB)"):
                out[s.step] = max(out.get(s.step, 0.0), s.value)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("log", type=Path)
    ap.add_argument(
        "--warmup", type=int, default=5, help="steps left out of the means (compile, allocator warm-up)"
    )
    ap.add_argument(
        "--tokens-per-step", type=int, default=4 * 4096, help="tokens per GPU per step, for ms/step"
    )
    ap.add_argument("--tb", type=Path, default=None, help="torchtitan's TensorBoard folder (dump_folder/tb)")
    ap.add_argument(
        "--gc-freq",
        type=int,
        default=50,
        help="torchtitan's training.gc_freq: a step that is a multiple of it also runs gc.collect (its default 50)",
    )
    a = ap.parse_args()
    rows = parse(a.log)
    if not rows:
        print(f"no torchtitan metric lines in {a.log}")
        return 1
    active = {}
    if a.tb and a.tb.exists():
        try:
            active = tb_max_active(a.tb)
        except Exception as e:  # noqa: BLE001 - the summary still stands without it
            print(f"(could not read TensorBoard events: {e})")
    print(
        f"{'step':>5}{'loss':>10}{'tok/s/GPU':>11}{'ms/step':>9}{'TFLOP/s':>9}{'MFU%':>7}{'resv GiB':>10}{'act GiB':>9}"
    )
    for s in sorted(rows):
        r = rows[s]
        ms = 1000 * a.tokens_per_step / r["tps"] if r["tps"] else float("nan")
        act = f"{active[s]:9.2f}" if s in active else f"{'-':>9}"
        print(
            f"{s:>5}{r['loss']:>10.4f}{r['tps']:>11,.0f}{ms:>9.1f}{r['tflops']:>9.1f}{r['mfu']:>7.2f}{r['mem']:>10.2f}{act}"
        )
    timed = [s for s in sorted(rows) if s > a.warmup]
    if not timed:
        print(f"no step after the {a.warmup} warm-up steps")
        return 1
    tps = [rows[s]["tps"] for s in timed]
    # mean tok/s over the timed steps = total tokens / total time = harmonic mean of per-step rates
    hmean = len(tps) / sum(1 / x for x in tps)
    mfu = statistics.fmean(rows[s]["mfu"] for s in timed) * hmean / statistics.fmean(tps)
    line = (
        f"torchtitan steps {timed[0]}-{timed[-1]} ({len(timed)} timed): {hmean:,.0f} tok/s/GPU "
        f"(median {statistics.median(tps):,.0f}), {1000 * a.tokens_per_step / hmean:.1f} ms/step, MFU {mfu:.2f}%, "
        f"peak reserved {max(rows[s]['mem'] for s in rows):.2f} GiB"
    )
    if active:
        line += f", peak active {max(active.values()):.2f} GiB (rank 0)"
    print(line)
    # A timed window of 10 steps that holds a GC step weighs it 1/10; a long run pays it once in gc_freq steps.
    gc = [s for s in timed if a.gc_freq > 0 and s % a.gc_freq == 0]
    plain = [s for s in timed if s not in gc]
    if gc and plain:
        ms_plain = statistics.fmean(1000 * a.tokens_per_step / rows[s]["tps"] for s in plain)
        ms_gc = statistics.fmean(1000 * a.tokens_per_step / rows[s]["tps"] for s in gc)
        ms = ms_plain + (ms_gc - ms_plain) / a.gc_freq
        print(
            f"torchtitan steps {plain[0]}-{plain[-1]} without its GC step{'s' if len(gc) > 1 else ''} "
            f"({', '.join(map(str, gc))}: {ms_gc:.1f} ms): {ms_plain:.1f} ms/step; that GC spread over "
            f"{a.gc_freq} steps: {ms:.1f} ms/step, {1000 * a.tokens_per_step / ms:,.0f} tok/s/GPU"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
