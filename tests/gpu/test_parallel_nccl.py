"""Parallel layouts on 2 GPUs with NCCL, launched by torchrun, against a 1-GPU run of the same model (fp32 without
TF32, so the 1e-5 relative tolerance of the CPU tests holds): FSDP, TP with loss parallel, EP, PP, and CP through
torch's ring attention (the CUDA path of parallel/context_parallel.py). Then bf16 smoke runs (FSDP mixed
precision, compile, selective AC) that must train without error and stay close to the fp32 losses."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from tests.distributed.common import layout_args

REPO = Path(__file__).resolve().parents[2]
P = "parallelism."

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs"),
]

LAYOUTS = {
    "fsdp2": {"training.local_batch_size": "2"},
    "tp2": {P + "tensor_parallel_degree": "2"},
    "ep2_fsdp2": {P + "expert_parallel_degree": "2", "training.local_batch_size": "4"},
    "ep2_fsdp2_experts_no_unit": {
        P + "expert_parallel_degree": "2",
        "training.local_batch_size": "4",
        P + "expert_1rank_fsdp_unit": "false",
    },
    "ep2_fsdp2_padded": {
        P + "expert_parallel_degree": "2",
        "training.local_batch_size": "4",
        P + "expert_route": "padded",
    },
    "ep2_tp2": {P + "expert_parallel_degree": "2", P + "tensor_parallel_degree": "2"},
    "pp2_interleaved": {
        P + "pipeline_parallel_degree": "2",
        P + "pipeline_parallel_schedule": "Interleaved1F1B",
    },
    "cp2": {P + "context_parallel_degree": "2"},
    "pp2_zbv": {P + "pipeline_parallel_degree": "2", P + "pipeline_parallel_schedule": "ZBV"},
}


def torchrun(tmp_path: Path, name: str, nproc: int, **overrides) -> list[float]:
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    folder = tmp_path / name
    # 128 tokens: CP 2 leaves half-chunks of 32 rows per rank; torch 2.11's ring attention cannot merge the
    # memory-efficient kernel's logsumexp (padded to 32 rows) for shorter ones
    base = {
        "metrics.enable_jsonl": "true",
        "job.config_file": str(empty),
        "training.seq_len": "128",
        "model.max_seq_len": "128",
        "model.original_seq_len": "128",
    }
    args = layout_args(str(folder), **{**base, **overrides})
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_", "MASTER_"))
    }
    cmd = ["torchrun", f"--nproc_per_node={nproc}", "--rdzv_backend=c10d", "--rdzv_endpoint=localhost:0"]
    out = subprocess.run(
        [*cmd, "-m", "titan_dsv3.train", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows]


@pytest.fixture(scope="module")
def gpu_reference(tmp_path_factory):
    return torchrun(tmp_path_factory.mktemp("ref"), "ref", 1)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_one_gpu(layout, gpu_reference, tmp_path):
    losses = torchrun(tmp_path, layout, 2, **LAYOUTS[layout])
    for a, b in zip(losses, gpu_reference, strict=True):
        assert abs(a - b) <= 1e-5 * b, (losses, gpu_reference)


@pytest.mark.parametrize(
    "extra",
    [
        {P + "expert_parallel_degree": "2", "training.local_batch_size": "4"},
        {
            P + "expert_parallel_degree": "2",
            P + "tensor_parallel_degree": "2",
            "compile.enable": "true",
            "activation_checkpoint.mode": "selective",
        },
        {  # compiled inside the checkpoint of every 2nd block, the EP route too (parallelize.apply_compile)
            P + "expert_parallel_degree": "2",
            "training.local_batch_size": "4",
            "compile.enable": "true",
            "activation_checkpoint.mode": "selective",
            "activation_checkpoint.selective_option": "2",
        },
        {  # the same without the experts' FSDP unit (their mesh has one rank)
            P + "expert_parallel_degree": "2",
            "training.local_batch_size": "4",
            P + "expert_1rank_fsdp_unit": "false",
            "compile.enable": "true",
            "activation_checkpoint.mode": "selective",
            "activation_checkpoint.selective_option": "2",
        },
        {  # the same with each MoE block one graph: sizes read in the graph, no expert FSDP unit
            P + "expert_parallel_degree": "2",
            "training.local_batch_size": "4",
            "compile.enable": "true",
            "compile.moe_one_graph": "true",
            "activation_checkpoint.mode": "selective",
            "activation_checkpoint.selective_option": "2",
        },
        {  # the fixed-size route: no host read, every block one graph without the experts' unit
            P + "expert_parallel_degree": "2",
            "training.local_batch_size": "4",
            P + "expert_route": "padded",
            P + "expert_1rank_fsdp_unit": "false",
            "compile.enable": "true",
            "activation_checkpoint.mode": "selective",
            "activation_checkpoint.selective_option": "2",
        },
    ],
    ids=[
        "fsdp_ep_bf16",
        "tp_ep_bf16_compile_sac",
        "fsdp_ep_bf16_compile_ac2",
        "fsdp_ep_bf16_compile_ac2_no_unit",
        "fsdp_ep_bf16_moe_one_graph",
        "fsdp_ep_bf16_compile_ac2_padded",
    ],
)
def test_bf16_runs(extra, gpu_reference, tmp_path):
    losses = torchrun(tmp_path, "bf16", 2, **{"training.mixed_precision": "bf16", **extra})
    for a, b in zip(losses, gpu_reference, strict=True):
        assert abs(a - b) <= 2e-2 * b, (losses, gpu_reference)
