"""AdamW with bf16 moments and fp32 master weights (DeepSeek-V3 section 3.3.2), fused on CUDA.

fp32 parameters are their own masters. bf16 parameters (training.mixed_precision = bf16_weights) get an fp32
master copy in the optimizer state, updated from the bf16 gradient, and the bf16 weight is rewritten from it.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor

from titan_dsv3.kernels.adamw_bf16_states import (
    adamw_bf16_master_reference,
    adamw_bf16_master_step,
    adamw_bf16_reference,
    adamw_bf16_step,
)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


class AdamWBF16States(torch.optim.Optimizer):
    """Decoupled-weight-decay Adam whose exp_avg / exp_avg_sq are stored in bf16.

    Honours ``self.grad_scale`` (a 0-dim tensor, like torch's fused AdamW): every gradient is divided by it.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.grad_scale: torch.Tensor | None = None

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(
                        p, dtype=torch.bfloat16, memory_format=torch.preserve_format
                    )
                    state["exp_avg_sq"] = torch.zeros_like(
                        p, dtype=torch.bfloat16, memory_format=torch.preserve_format
                    )
                if p.dtype == torch.bfloat16 and "master" not in state:
                    state["master"] = p.detach().float()
                state["step"] += 1
                pl, gl = _local(p), _local(p.grad)
                m, v = _local(state["exp_avg"]), _local(state["exp_avg_sq"])
                kw = dict(
                    lr=float(group["lr"]),
                    beta1=beta1,
                    beta2=beta2,
                    eps=group["eps"],
                    weight_decay=group["weight_decay"],
                    step=int(state["step"]),
                )
                scale = self._scale(pl.device)
                fused = pl.is_cuda and pl.is_contiguous() and gl.is_contiguous()
                if "master" in state:
                    master = _local(state["master"])
                    step_fn = adamw_bf16_master_step if fused else adamw_bf16_master_reference
                    step_fn(pl, master, gl, m, v, scale, **kw)
                else:
                    step_fn = adamw_bf16_step if fused and pl.dtype == torch.float32 else adamw_bf16_reference
                    step_fn(pl, gl.to(pl.dtype), m, v, scale, **kw)
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's, but the moments stay bf16 and the masters fp32 (torch casts state to the param dtype)."""
        saved = state_dict["state"]
        super().load_state_dict(state_dict)
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(ids, params):
            for key in ("exp_avg", "exp_avg_sq", "master"):
                if i in saved and key in saved[i]:
                    self.state[p][key] = saved[i][key].to(device=p.device, copy=True)

    def _scale(self, device: torch.device) -> torch.Tensor:
        if self.grad_scale is None:
            if getattr(self, "_ones", None) is None or self._ones.device != device:
                self._ones = torch.ones((), dtype=torch.float32, device=device)
            return self._ones
        return self.grad_scale.to(device=device, dtype=torch.float32)
