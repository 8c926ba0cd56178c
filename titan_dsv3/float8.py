"""FP8 training: dense linears through torchao's float8 linears (or ours), the output head and routed experts
through our FP8 GEMMs.

Call apply_float8(model, job_config.float8) on the model built on the meta device, before parallelisation (FSDP
float8 all-gather needs the converted modules before fully_shard). Every conversion keeps parameter names and the
state dict unchanged, so checkpoints load either way.

Dense linears (float8.enable): torchao Float8LinearConfig from the recipe name; tensorwise scales each tensor
once (1.53x on large MLP shapes on H100, ../shared/GPU.md), rowwise per row (1.22x, better accuracy). Linears
with a dimension under min_dim gain nothing (the casts cost more than the faster GEMM saves), and those named in
filter_fqns (the output head by default) stay in high precision.

Our FP8 linear (kernels/fp8_linear.py: tensorwise, one quantising pass an operand writing both layouts its GEMMs
need; gradients in e5m2): float8.output_head puts the output head on it (the largest GEMM of bench6, which
torchao's linear made slower: 0.92x end to end), float8.linear_backend = 'titan' the dense linears in place of
torchao's. On H100 the head saves about 9 ms of bench6's 170 ms FP8 step (1.105x -> 1.156x bf16; loss after
300 steps -0.8% of bf16's over three seeds); ours for the dense linears is no faster than torchao's (RESULTS.md,
stop 34).
Both are off by default, as DeepSeek-V3's recipe keeps the head in high precision; on CPU they run torch's cast
and fp32 GEMMs on the dequantised operands. float8.fuse_head_loss goes further: the head returns its input and
weight and the loss runs kernels/fp8_head_loss.py, the GEMMs and the cross-entropy as one op (not yet timed).

Routed experts (float8.moe_experts): GroupedExperts modules become FP8GroupedExperts, a subclass whose FFN
runs kernels/fp8_grouped_gemm.py (e4m3 with DeepSeek-V3's 1x128 activation / 128x128 weight scaling); with
float8.fuse_moe_route, FP8RoutedExperts, which routed on one device (route_locally) also runs the copies' gather,
their return to token order and the weighted sum inside the op (kernels/fp8_routed_experts.py; not yet timed). The
off-the-shelf rowwise FP8 grouped GEMM is slower than bf16 on H100 (0.77x eager, GPU.md); ours fuses the
quantisation into the GEMMs' neighbours, and on Hopper runs its GEMMs as warp-specialised Gluon kernels: on H200
bench6's expert FFN runs at 1.33-1.36x bf16 (torchao's rowwise: 0.85x compiled) and bench6 end to end at 1.11x
with the dense linears in FP8 too (RESULTS.md, 2026-12-01). float8.moe_experts stays off by default: it needs
CUDA, and after 300 steps its loss matches bf16's only on average (-0.13% over four seeds, -0.8% to +0.7% by
seed; -2.7% to +1.3% over five earlier ones).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from titan_dsv3.config.job_config import Float8
from titan_dsv3.models.moe import GroupedExperts, _local_shard
from titan_dsv3.optim.losses import HeadInput


def _linear_filter(cfg: Float8):
    def keep(module: nn.Module, fqn: str) -> bool:
        if not isinstance(module, nn.Linear):
            return False
        if any(name in fqn for name in cfg.filter_fqns):
            return False
        dims = (module.in_features, module.out_features)
        # fp8 GEMMs need both dims divisible by 16; below min_dim the casts cost more than they save
        return min(dims) >= cfg.min_dim and all(d % 16 == 0 for d in dims)

    return keep


def _autocast_input(x: torch.Tensor) -> torch.Tensor:
    """x in the autocast dtype when autocast is on: our FP8 kernels take what the layer would have computed in."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return x.to(torch.get_autocast_dtype(device_type))
    return x


class FP8Linear(nn.Linear):
    """A bias-free linear on our FP8 GEMMs (kernels/fp8_linear.py); same parameter and state dict as nn.Linear.

    Training calls only: without autograd (evaluation, generation) and when the token count is not a multiple of
    16 (cuBLAS fp8) it runs as the high-precision linear it replaced. Gradients in e5m2, as torchao's tensorwise
    recipe has them."""

    grad_dtype = torch.float8_e5m2

    @staticmethod
    def _runs_fp8(x: torch.Tensor) -> bool:
        """A training call (autograd on) whose token count is a multiple of 16."""
        return torch.is_grad_enabled() and x.shape[:-1].numel() % 16 == 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._runs_fp8(x):
            return super().forward(x)
        from titan_dsv3.kernels.fp8_linear import fp8_linear

        x = _autocast_input(x)
        return fp8_linear(x.reshape(-1, x.shape[-1]), self.weight, self.grad_dtype).view(*x.shape[:-1], -1)


class FP8OutputHead(FP8Linear):
    """The output head on our FP8 linear, its logits' gradient in e5m2. e4m3 halves the error of one step's
    gradient (benchmarks/fp8_grad_formats.py) but flushes the smallest probabilities to zero, and with it
    bench6's loss after 300 steps was 1.7% and 3.7% above bf16's (two seeds; e5m2: -0.8% on average over three;
    RESULTS.md stop 34)."""

    grad_dtype = torch.float8_e5m2


class FP8FusedHead(FP8OutputHead):
    """The output head fused with its loss (float8.fuse_head_loss): a training call returns a HeadInput (its input
    and weight) and the loss runs kernels/fp8_head_loss.py, the GEMMs and the cross-entropy in one op, where
    FP8OutputHead hands bf16 logits to a loss computed apart. Evaluation, generation and token counts off a
    multiple of 16 get logits, as from FP8OutputHead."""

    def forward(self, x: torch.Tensor) -> torch.Tensor | HeadInput:
        if not (self.training and self._runs_fp8(x)):
            return super().forward(x)
        return HeadInput(_autocast_input(x), self.weight)


class FP8GroupedExperts(GroupedExperts):
    """Routed experts with FP8 grouped GEMMs (kernels/fp8_grouped_gemm.py); same parameters and state dict."""

    def ffn(self, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        from titan_dsv3.kernels.fp8_grouped_gemm import fp8_grouped_swiglu

        x_ND = _autocast_input(x_ND)
        # expert parallelism hands in distributed tensors: compute with the local shard of the experts
        w1, w2, w3 = (_local_shard(w) for w in (self.w1, self.w2, self.w3))
        return fp8_grouped_swiglu(x_ND, counts_E, w1, w2, w3)


class FP8RoutedExperts(FP8GroupedExperts):
    """float8.fuse_moe_route: routed locally, the copies' gather, their return to token order and the weighted sum
    run inside the FP8 op (kernels/fp8_routed_experts.py); expert parallelism would call the FFN alone."""

    def routed(
        self, x_TD: torch.Tensor, weights_TK: torch.Tensor, order_N: torch.Tensor, counts_E: torch.Tensor
    ) -> torch.Tensor:
        from titan_dsv3.kernels.fp8_routed_experts import fp8_routed_experts

        w1, w2, w3 = (_local_shard(w) for w in (self.w1, self.w2, self.w3))
        return fp8_routed_experts(_autocast_input(x_TD), weights_TK, order_N, counts_E, w1, w2, w3)


def apply_float8(model: nn.Module, cfg: Float8) -> str | None:
    """Convert model in place as cfg asks (nothing when float8.enable, output_head and moe_experts are off). Returns
    a line saying what was converted, for the trainer to print (None when nothing was asked): a run with
    float8.enable whose linears all fall under min_dim or the filters runs in bf16 and should say so."""
    said = []
    if cfg.enable:
        keep = _linear_filter(cfg)
        if cfg.linear_backend == "titan":
            n = 0
            for fqn, module in model.named_modules():
                if keep(module, fqn) and type(module) is nn.Linear and module.bias is None:
                    module.__class__ = FP8Linear
                    n += 1
        else:
            from torchao.float8 import Float8LinearConfig, convert_to_float8_training

            config = Float8LinearConfig.from_recipe_name(cfg.recipe)
            if cfg.fsdp_float8_all_gather:
                config = dataclasses.replace(config, enable_fsdp_float8_all_gather=True)
            convert_to_float8_training(model, config=config, module_filter_fn=keep)
            n = sum(type(m).__name__ == "Float8Linear" for m in model.modules())
        if n:
            how = "ours, tensorwise" if cfg.linear_backend == "titan" else cfg.recipe
            said.append(f"{n} linears in FP8 ({how}, min_dim {cfg.min_dim})")
        else:
            said.append(
                f"no linear converted (every one has a dim under float8.min_dim {cfg.min_dim}, one not divisible "
                f"by 16, or a name in float8.filter_fqns {cfg.filter_fqns}): the dense layers stay in high precision"
            )
    if cfg.output_head:
        head = getattr(model, "output", None)
        if type(head) is not nn.Linear or head.bias is not None:
            raise ValueError(
                f"float8.output_head: the model's output head is {type(head).__name__}, not a bias-free nn.Linear "
                "(tied to the embedding, or already converted: keep 'output' in float8.filter_fqns)"
            )
        head.__class__ = FP8FusedHead if cfg.fuse_head_loss else FP8OutputHead
        said.append("output head on FP8 GEMMs" + (", fused with its loss" if cfg.fuse_head_loss else ""))
    if cfg.moe_experts:
        swapped = 0
        for module in model.modules():
            if type(module) is GroupedExperts:
                _, hidden, dim = module.w1.shape
                if dim % 128 or hidden % 128:
                    raise ValueError(
                        f"float8.moe_experts: dim {dim} and hidden {hidden} must be multiples of 128"
                    )
                module.__class__ = FP8RoutedExperts if cfg.fuse_moe_route else FP8GroupedExperts
                swapped += 1
        fused = ", the route folded in" if cfg.fuse_moe_route else ""
        said.append(f"{swapped} routed-expert modules on FP8 grouped GEMMs{fused}")
    return "float8: " + "; ".join(said) if said else None
