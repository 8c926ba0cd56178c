"""Per-GPU memory of a training run: parameters, gradients, optimizer states, activations, logits, overheads.

The estimate walks one training step on the most loaded rank: forward (saved activations pile up), then backward
unit by unit (saved activations freed, gradients allocated); the peak of that walk is compared with what
torch.cuda.max_memory_allocated reports, and a fixed CUDA context plus allocator slack is added for the device.

Assumptions:
- FSDP (ParallelDims.uses_fsdp: sharded data ranks, TP, or experts data-parallel over several ranks): FSDP2 mixed
  precision as parallel/parallelize.py applies it. fp32 master parameters, fp32 gradients and the Adam moments
  are sharded; each block is all-gathered in bf16 for its forward and again for its backward with its neighbour
  prefetched, and its gradient is reduce-scattered in fp32 (bf16 unsharded grad + fp32 copy-in buffer). The root
  unit (embedding, final norm, output head) stays gathered for the whole step and reduce-scatters its bf16
  gradients after the backward. With PP (no resharding after forward) a stage keeps all its blocks gathered.
  Routed experts without an FSDP unit (parallelism.expert_1rank_fsdp_unit = false, EP over every data rank): each
  MoE block that is not checkpointed keeps its local experts' bf16 cast until its backward (measured on 2 x H200:
  +6.2 GiB where this adds 6.7 without AC; +3.7 where it adds 6.7 with every 2nd block checkpointed).
- The padded EP route (parallelism.expert_route = padded) sizes the routed copies for the worst case: counted as
  ep x k copies a token (every k-sized term, a slight over-count of the router's own top-k tensors).
- One data rank (no FSDP): fp32 parameters under bf16 autocast. Eager blocks keep a bf16 copy of every weight
  from forward to their backward (the autocast cache, the expert casts saved by grouped_mm); compiled blocks recast
  from the fp32 parameter in backward and keep none. training.mixed_precision = bf16_weights: bf16 parameters and
  gradients, fp32 masters and bf16 moments in the optimizer (12 bytes a parameter in all).
- Routed experts of a layer are split over ep ranks and each split is FSDP-sharded over efsdp: one copy lives on
  ep x efsdp = dp_shard x cp x tp ranks. Dense parameters are split by tp and sharded over dp_shard x cp. Shards
  are even splits (FSDP's padding of uneven dims is ignored; tools.dry_run shows the exact shards).
- Attention is cuDNN SDPA: it saves q, k, v, out and the fp32 log-sum-exp, never an S x S matrix.
- TP is sequence parallel: block activations are divided by tp, plus the all-gathered bf16 inputs of the attention
  and FFN (2 x 2 x dim bytes per token, not divided). CP divides the tokens of a micro-batch by cp.
- PP: layers split evenly; in 1F1B stage s holds min(microbatches, pp - s) micro-batches in flight (interleaved
  schedules x 1.5); embedding on the first stage, final norm, output head and MTP on the last.
- Gradient accumulation (or PP micro-batches): after the first micro-batch every gradient stays allocated.
- Not modelled: NCCL buffers beyond a fixed 1 GiB, torch.compile's own graph memory, allocator fragmentation
  beyond the slack constants below, the optimizer step's temporaries (none for fused AdamW and our bf16-moment
  kernel).
- Measured (tests/unit/test_memory.py lists them): one H100, single rank, eager and compiled, every AC mode, within
  7% of the allocated peak; two H200s, FSDP 2 and FSDP 2 + EP 2, within 10%. TP, PP, CP and larger worlds are not
  measured.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from titan_dsv3.models.args import ModelArgs
from titan_dsv3.parallel.dims import ParallelDims

GiB = 2**30
# Constants measured with benchmarks/bench_memory.py and torch 2.11 (2026-11-22). One H100 80GB: the CUDA context is
# what cudaMemGetInfo shows beyond the allocator's reserved memory (0.75 GiB); reserved exceeded allocated by 2-17%
# over seven bench6 settings; 64 MiB of workspaces (cuBLAS takes 32 MiB on Hopper) matches the debug model's peak.
# Two H200s, bench6 under FSDP 2 (with and without EP 2): reserved exceeded allocated by 22-27% with
# PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True and by 33-44% without; context and NCCL took 1.6-2.0 GiB.
# (The allocator frees cached blocks before it fails, so a device total with this slack is a conservative fit test.)
WORKSPACE_BYTES = 64 * 2**20  # cuBLAS/cuBLASLt and cuDNN workspaces, taken from the caching allocator
CUDA_CONTEXT_BYTES = 0.75 * GiB  # CUDA context, kernels and library handles: outside the caching allocator
NCCL_BYTES = 1.0 * GiB  # NCCL communicators and buffers when world_size > 1
ALLOCATOR_SLACK = 0.10  # reserved over allocated (fragmentation of the caching allocator), one rank
FSDP_ALLOCATOR_SLACK = 0.25  # the same under FSDP (gathered, reduce-scattered buffers); expandable segments
AC_MODES = ("none", "selective", "full")


@dataclass
class Layout:
    """Parallel degrees of one run (the fields of ParallelDims that memory depends on)."""

    dp_replicate: int = 1
    dp_shard: int = 1
    cp: int = 1
    tp: int = 1
    pp: int = 1
    ep: int = 1
    pp_microbatches: int = 1
    pp_schedule: str = "1F1B"

    @classmethod
    def from_dims(cls, dims) -> Layout:
        return cls(
            dims.dp_replicate,
            dims.dp_shard,
            dims.cp,
            dims.tp,
            dims.pp,
            dims.ep,
            dims.pp_microbatches,
            dims.pp_schedule,
        )

    @property
    def world_size(self) -> int:
        return self.dp_replicate * self.dp_shard * self.cp * self.tp * self.pp

    # the derived degrees are ParallelDims' own (they read only the fields both classes have)
    fsdp = ParallelDims.fsdp
    efsdp = ParallelDims.efsdp
    fsdp_enabled = ParallelDims.fsdp_enabled
    separate_experts = ParallelDims.separate_experts
    uses_fsdp = ParallelDims.uses_fsdp

    def describe(self) -> str:
        parts = [
            f"{k} {v}"
            for k, v in (
                ("replicate", self.dp_replicate),
                ("fsdp", self.dp_shard),
                ("cp", self.cp),
                ("tp", self.tp),
                ("pp", self.pp),
                ("ep", self.ep),
            )
            if v > 1 or k == "fsdp"
        ]
        return ", ".join(parts)


@dataclass
class Estimate:
    """Peak memory of one rank, in bytes; `allocated` is comparable to torch.cuda.max_memory_allocated."""

    params: float  # master parameters (sharded; fp32, or bf16 with bf16_weights) and the RoPE table
    grads: float  # gradients (sharded), all of them
    optimizer: float  # Adam moments
    weights_bf16: float  # FSDP-gathered blocks or autocast weight copies at the peak
    activations: float  # saved activations of the blocks at the peak (all in-flight micro-batches)
    logits: float  # output-head logits and loss buffers at the peak
    transient: float  # recomputation and activation-gradient buffers at the peak
    grads_at_peak: float  # part of `grads` allocated at the peak
    workspace: float = WORKSPACE_BYTES
    context: float = CUDA_CONTEXT_BYTES
    slack: float = ALLOCATOR_SLACK
    peak_phase: str = ""
    stage: int = 0
    params_local: int = 0  # this rank's parameter elements (sharded)

    @property
    def allocated(self) -> float:
        return (
            self.params
            + self.optimizer
            + self.grads_at_peak
            + self.weights_bf16
            + self.activations
            + self.logits
            + self.transient
            + self.workspace
        )

    @property
    def total(self) -> float:
        """Device memory: allocated plus allocator slack plus CUDA context (and NCCL buffers)."""
        return self.allocated * (1 + self.slack) + self.context

    def table(self) -> list[tuple[str, float]]:
        return [
            ("parameters", self.params),
            ("optimizer states", self.optimizer),
            ("gradients (at peak)", self.grads_at_peak),
            ("bf16 weights (gathered/cast)", self.weights_bf16),
            ("activations", self.activations),
            ("logits + loss", self.logits),
            ("recompute/grad buffers", self.transient),
            ("workspaces", self.workspace),
            ("allocated peak", self.allocated),
            ("+ context, slack", self.total - self.allocated),
            ("device total", self.total),
        ]


# ---- activations saved for backward, bytes per token ---------------------------------------------------------
# d dim, H heads on this rank, n/r/v the nope/rope/v head dims, c kv_lora_rank, q q_lora_rank, E routed experts,
# k top-k, I expert width, S shared width (n_shared x I), F dense FFN width, V vocab. bf16 = 2 bytes, fp32 = 4.
# An eager RMSNorm saves its fp32 input copy (4d), rsqrt (4) and the bf16 normalised tensor (2d). Its output is
# fp32 under autocast (fp32 weight x bf16), and every consumer linear saves its own bf16 cast of it (2d each);
# with bf16 weights (FSDP mixed precision, bf16_weights) the output is bf16 and saved once (2d).


def attention_bytes(a: ModelArgs, compiled: bool, tp: int = 1, autocast: bool = True) -> float:
    """MLA with its pre-norm, per token.

    eager:    norm 6d+4 and its output for wq/wq_a and wkv_a (autocast 4d, bf16 weights 2d); q low-rank: q_norm
              6q+4 and wq_b's input 2q; kv_norm 6c+4 and wkv_b's input 2c; SDPA: q and k 2H(n+r) each, v a view
              that keeps the whole wkv_b output 2H(n+v), out 2Hv, lse 4H; wo's input (a copy of out) 2Hv.
    compiled: the norms keep only their bf16 output (2d, 2q, 2c) and rstd; SDPA and wo's input as eager.
    """
    d, c, q = a.dim, a.kv_lora_rank, a.q_lora_rank
    h = a.n_heads / tp
    n, r, v = a.qk_nope_head_dim, a.qk_rope_head_dim, a.v_head_dim
    sdpa = 4 * h * (n + r) + 2 * h * (n + v) + 2 * h * v + 4 * h
    if compiled:
        return 2 * d + 4 + (2 * q + 4 if q else 0) + 2 * c + 4 + sdpa + 2 * h * v
    norm = 6 * d + 4 + (4 if autocast else 2) * d
    return norm + (8 * q + 4 if q else 0) + 8 * c + 4 + sdpa + 2 * h * v


def ffn_bytes(a: ModelArgs, moe: bool, compiled: bool, autocast: bool = True) -> float:
    """Dense SwiGLU or MoE with its pre-norm, per token.

    dense eager:  norm 6d+4 and its output for w1, w3 (autocast 4d, bf16 weights 2d); w1/w3 outputs, silu and
                  product 8F.
    dense compiled: norm output 2d+4, w1/w3 outputs 4F (silu and product recomputed).
    MoE eager:    norm 6d+4; router input in fp32 4d, scores 4E, top-k ids/weights/normaliser 12k+4; sort order and
                  gather index 16k; routed copies (bf16) 2dk; expert w1/w3 outputs, silu, product 8Ik; expert
                  outputs and the weighted-sum input 4dk; bf16 gates 2k; shared experts: their input (autocast 4d,
                  bf16 weights 2d) and 8S.
    MoE compiled: norm output 2d + fp32 router input 4d, scores 4E, routing 40k, routed copies 2dk, 4Ik,
                  weighted-sum input 2dk, shared 4S.
    """
    d = a.dim
    cast = (4 if autocast else 2) * d
    if not moe:
        f = a.inter_dim
        return 2 * d + 4 + 4 * f if compiled else 6 * d + 4 + cast + 8 * f
    e, k, i = a.n_routed_experts, a.n_activated_experts, a.moe_inter_dim
    s = a.n_shared_experts * a.moe_inter_dim
    if compiled:
        return 6 * d + 4 + 4 * e + 40 * k + 4 * d * k + 4 * i * k + 4 * s
    shared = cast + 8 * s if s else 0
    return 10 * d + 8 + 4 * e + 30 * k + 6 * d * k + 8 * i * k + shared


def selective_op_bytes(a: ModelArgs, moe: bool, tp: int = 1) -> float:
    """Selective AC by op (parallel/activation_checkpoint.py): the block input (2d) plus the outputs of every other
    matmul and grouped matmul (counted separately, the first of each saved), SDPA's out and lse, and the routing ops
    (top-k values and ids 12k, stable sort 16k)."""
    d, c, q, h = a.dim, a.kv_lora_rank, a.q_lora_rank, a.n_heads / tp
    n, r, v = a.qk_nope_head_dim, a.qk_rope_head_dim, a.v_head_dim
    mm = ([2 * q, 2 * h * (n + r)] if q else [2 * h * (n + r)]) + [2 * (c + r), 2 * h * (n + v), 2 * d]
    if moe:
        mm.append(4 * a.n_routed_experts)  # the router's fp32 logits
        s = a.n_shared_experts * a.moe_inter_dim
        if s:
            mm += [2 * s, 2 * s, 2 * d]
        k, i = a.n_activated_experts, a.moe_inter_dim
        grouped = 2 * i * k + 2 * d * k  # w1 and w2 outputs saved, w3 recomputed
        routing = 12 * k + 16 * k
    else:
        mm += [2 * a.inter_dim, 2 * a.inter_dim, 2 * d]
        grouped = routing = 0
    return 2 * d + sum(mm[0::2]) + grouped + routing + 2 * h * v + 4 * h


def block_bytes(a: ModelArgs, moe: bool, compiled: bool, tp: int = 1, autocast: bool = True) -> float:
    """Saved activations of one transformer block without activation checkpointing, per token of the micro-batch."""
    per = attention_bytes(a, compiled, tp, autocast) + ffn_bytes(a, moe, compiled, autocast) / tp
    return per + (4 * a.dim if tp > 1 else 0)


def block_grad_buffers(a: ModelArgs, moe: bool, tp: int = 1) -> float:
    """Activation gradients alive while a block runs backward, per token: the larger of attention (grads of q, k,
    v and the latent inputs) and FFN (grads of routed copies and expert hiddens), in bf16 plus fp32 accumulation."""
    h = a.n_heads / tp
    attn = 2 * h * (2 * a.qk_head_dim + a.qk_nope_head_dim + a.v_head_dim) + 8 * a.dim
    if moe:
        k = a.n_activated_experts
        ffn = (4 * a.dim * k + 4 * a.moe_inter_dim * k) / tp + 8 * a.dim
    else:
        ffn = 4 * a.inter_dim / tp + 8 * a.dim
    return max(attn, ffn)


def head_bytes(a: ModelArgs, compiled_loss: bool, tp: int = 1) -> tuple[float, float, float]:
    """(saved, forward buffers, backward buffers) of one output head and its loss, per token.

    eager: bf16 logits (held by the model output until backward) 2V and the fp32 log-softmax output 4V are saved;
           the forward briefly holds an fp32 copy of the logits (4V); backward holds the fp32 gradient of the loss
           and of the log-softmax (8V). compiled: the fused loss keeps the bf16 logits (2V) and writes an fp32 then
           a bf16 gradient (6V). The final norm and the head input add 8d.
    """
    vocab = a.vocab_size / tp
    if compiled_loss:
        return 2 * vocab + 8 * a.dim, 0.0, 6 * vocab
    return 6 * vocab + 8 * a.dim, 4 * vocab, 8 * vocab


# ---- parameters per unit ---------------------------------------------------------------------------------------


def _block_params(a: ModelArgs, moe: bool) -> tuple[int, int]:
    """(dense parameters, routed-expert parameters) of one block."""
    total = a._block_params(moe, active=False)
    experts = 3 * a.dim * a.moe_inter_dim * a.n_routed_experts if moe else 0
    return total - experts, experts


@dataclass
class _Unit:
    name: str
    dense: int  # parameters split by tp and sharded over fsdp
    experts: int = 0  # routed-expert parameters split by ep and sharded over efsdp
    saved: float = 0.0  # bytes saved for backward (one micro-batch)
    recompute: float = 0.0  # bytes rebuilt during its backward (checkpointed blocks)
    grad_buffers: float = 0.0  # activation-gradient buffers during its backward
    fwd_buffers: float = 0.0  # transient of its forward (the eager loss's fp32 copy of the logits)
    checkpointed: bool = False
    compiled: bool = False
    root: bool = False  # embedding, final norm, output head: FSDP's root unit, gathered for the whole step
    head: bool = False


def _stage_layers(n_layers: int, pp: int, stage: int) -> range:
    sizes = [n_layers // pp + (1 if s < n_layers % pp else 0) for s in range(pp)]
    start = sum(sizes[:stage])
    return range(start, start + sizes[stage])


def _checkpointed(index: int, mode: str, option: str) -> bool:
    if mode == "none":
        return False
    if mode == "full" or option == "op":
        return True
    return index % int(option) == 0


def _units(
    a: ModelArgs,
    lay: Layout,
    stage: int,
    tokens: float,
    ac_mode: str,
    ac_option: str,
    compiled: bool,
    compiled_loss: bool,
    autocast: bool,
) -> list[_Unit]:
    """The stage's parameter units in forward order, with their activations for `tokens` tokens of one micro-batch."""
    tp = lay.tp
    units: list[_Unit] = []
    if stage == 0:
        units.append(_Unit("embedding", a.vocab_size * a.dim, saved=8 * tokens, root=True))
    blocks = [(f"layer {i}", i >= a.n_dense_layers, i) for i in _stage_layers(a.n_layers, lay.pp, stage)]
    if stage == lay.pp - 1:
        blocks += [(f"mtp {k}", a.n_moe_layers > 0, a.n_layers + k) for k in range(a.mtp_depth)]
    saved, fwd, bwd = (x * tokens for x in head_bytes(a, compiled_loss, tp))
    for name, moe, index in blocks:
        dense, experts = _block_params(a, moe)
        full = block_bytes(a, moe, compiled, tp, autocast) * tokens
        ckpt = _checkpointed(index, ac_mode, ac_option)
        if not ckpt:
            kept, recompute = full, 0.0
        elif ac_mode == "selective" and ac_option == "op":
            kept, recompute = selective_op_bytes(a, moe, tp) * tokens, full
        else:
            kept, recompute = 2 * a.dim * tokens, full
        unit = _Unit(
            name,
            dense,
            experts,
            kept,
            recompute,
            block_grad_buffers(a, moe, tp) * tokens,
            checkpointed=ckpt,
            compiled=compiled,
        )
        units.append(unit)
        if name.startswith("mtp"):
            # enorm/hnorm of the embedding and hidden state, and eh_proj's bf16 input (eager 16d, compiled 4d)
            unit.dense += 2 * a.dim + 2 * a.dim * a.dim + a.dim
            unit.saved += (4 if compiled else 16) * a.dim * tokens
            units.append(_Unit(f"{name} head", 0, saved=saved, grad_buffers=bwd, fwd_buffers=fwd, head=True))
        elif index == a.n_layers - 1:
            head_params = a.dim + (0 if a.tie_embeddings else a.vocab_size * a.dim)
            units.append(
                _Unit(
                    "head", head_params, saved=saved, grad_buffers=bwd, fwd_buffers=fwd, root=True, head=True
                )
            )
    return units


# ---- the walk ----------------------------------------------------------------------------------------------------


def _walk(
    units: list[_Unit],
    lay: Layout,
    weights: str,
    inflight: float,
    grads_always: bool,
    reshard: bool,
    experts_outside: bool = False,
) -> dict:
    """Peak over forward and backward of one micro-batch (other in-flight micro-batches add their saved bytes).

    weights: 'fsdp' (sharded fp32 masters gathered in bf16), 'autocast' (fp32 under autocast, one data rank) or
    'bf16' (bf16 weights and grads, fp32 masters in the optimizer). experts_outside: under FSDP the routed experts
    have no unit (parallelism.expert_1rank_fsdp_unit = false), so each MoE block that is not checkpointed keeps the
    bf16 cast of its local experts from forward to backward. Returns the peak's parts in bytes.
    """
    fsdp = weights == "fsdp"
    dense_shard = lay.tp * (lay.fsdp if fsdp else 1)
    expert_shard = lay.dp_shard * lay.cp * lay.tp if fsdp else lay.ep
    grad_bytes = 2 if weights == "bf16" else 4

    def local(u: _Unit) -> float:  # this rank's share of the unit's parameters (elements)
        return u.dense / dense_shard + u.experts / expert_shard

    def gathered(u: _Unit) -> float:  # elements the unit computes with on this rank
        return u.dense / lay.tp + u.experts / lay.ep

    def held(u: _Unit) -> float:  # bf16 weight copies kept from its forward to its backward (bytes)
        if weights == "fsdp":
            return 2 * u.experts / lay.ep if experts_outside and not u.checkpointed else 0.0
        if weights != "autocast" or u.compiled or u.checkpointed or u.name == "embedding":
            return 0.0
        return 2 * gathered(u)

    grads_total = grad_bytes * sum(local(u) for u in units)
    root = 2 * sum(gathered(u) for u in units if u.root) if fsdp else 0.0  # gathered for the whole step
    blocks = [u for u in units if not u.root and not u.head]
    biggest = max((gathered(u) for u in blocks), default=0.0)
    if fsdp and not reshard:  # PP: a stage keeps its blocks gathered between micro-batches
        root += 2 * sum(gathered(u) for u in blocks)
        biggest = 0.0
    other = (inflight - 1) * sum(u.saved for u in units)
    best = {"bytes": -1.0}

    def consider(phase, acts, grads, wts, logits, transient):
        total = acts + other + grads + wts + logits + transient
        if total > best["bytes"]:
            best.update(
                bytes=total,
                phase=phase,
                activations=acts + other,
                grads=grads,
                weights=wts,
                logits=logits,
                transient=transient,
            )

    acts = sum(u.saved for u in units if not u.head)
    logits = sum(u.saved for u in units if u.head)
    grads = grads_total if grads_always else 0.0
    # end of forward: every saved tensor; autocast also caches the bf16 casts of checkpointed eager blocks
    if fsdp:  # the last block (kept for backward) and the current one
        wts = root + 2 * 2 * biggest + sum(held(u) for u in units)
    else:
        wts = sum(
            held(u)
            + (2 * u.dense / lay.tp if weights == "autocast" and u.checkpointed and not u.compiled else 0.0)
            for u in units
        )
    consider("end of forward", acts, grads, wts, logits, max((u.fwd_buffers for u in units), default=0.0))

    # backward, last unit first
    done = 0.0
    copies = sum(held(u) for u in units)
    root_grads = 0.0
    for j in range(len(units) - 1, -1, -1):
        u = units[j]
        if fsdp:
            if (
                u.head or u.root
            ):  # the output head's bf16 grads (shared by the MTP heads) wait for the root's RS
                root_grads = 2 * sum(gathered(v) for v in units if v.root)
            if u.root:
                wts = root + root_grads + copies
            else:  # this block, the prefetched one before it, its bf16 grads and the fp32 reduce-scatter input
                prev = gathered(units[j - 1]) if j > 0 and not units[j - 1].root and reshard else 0.0
                wts = (
                    root
                    + root_grads
                    + (2 * gathered(u) + 6 * gathered(u) if reshard else 6 * gathered(u))
                    + 2 * prev
                    + copies
                )
        else:
            wts = copies + (2 * gathered(u) if weights == "autocast" and not u.compiled else 0.0)
        grads = grads_total if grads_always else done + grad_bytes * local(u)
        consider(f"backward of {u.name}", acts, grads, wts, logits, u.recompute + u.grad_buffers)
        if u.head:
            logits -= u.saved
        else:
            acts -= u.saved
        copies -= held(u)
        done += grad_bytes * local(u)
    if fsdp and root:
        # the root unit's gradients are reduce-scattered last: bf16 grads plus their fp32 copy-in buffer
        consider("root reduce-scatter", 0.0, grads_total, root + 3 * root_grads, 0.0, 0.0)
    consider("optimizer step", 0.0, grads_total, 0.0, 0.0, 0.0)
    best["params_local"] = sum(local(u) for u in units)
    return best


def estimate(
    a: ModelArgs,
    lay: Layout,
    local_batch: int,
    seq_len: int,
    *,
    grad_accum: int = 1,
    ac_mode: str = "none",
    ac_option: str = "op",
    compiled: bool = False,
    compiled_loss: bool | None = None,
    state_dtype: str = "float32",
    bf16_weights: bool = False,
    reshard_after_forward: bool | None = None,
    experts_unit: bool = True,
    padded_route: bool = False,
) -> Estimate:
    """Peak memory of the most loaded rank for one training step (see the module docstring for the assumptions).

    experts_unit: parallelism.expert_1rank_fsdp_unit; false matters only where the routed experts' FSDP mesh has one
    rank (EP over every data rank). padded_route: parallelism.expert_route = padded (ep x k copies a token)."""
    if ac_mode not in AC_MODES:
        raise ValueError(f"ac_mode = {ac_mode!r}; use one of {AC_MODES}")
    if padded_route and lay.ep > 1:
        a = replace(a, n_activated_experts=a.n_activated_experts * lay.ep)
    compiled_loss = compiled if compiled_loss is None else compiled_loss
    weights = "fsdp" if lay.uses_fsdp else "bf16" if bf16_weights else "autocast"
    reshard = lay.pp == 1 if reshard_after_forward is None else reshard_after_forward
    micro = lay.pp_microbatches if lay.pp > 1 else 1
    # as parallelize.apply_fsdp decides: separate experts whose FSDP mesh (replicas x efsdp) has one rank
    experts_outside = (
        weights == "fsdp" and not experts_unit and lay.separate_experts and lay.dp_replicate * lay.efsdp == 1
    )
    tokens = local_batch / micro * seq_len / lay.cp
    if weights == "bf16":
        param_bytes, state_bytes = 2, 8  # fp32 masters + bf16 moments in the optimizer
    else:
        param_bytes, state_bytes = 4, 8 if state_dtype == "float32" else 4
    best: Estimate | None = None
    for stage in range(lay.pp):
        inflight = 1.0
        if lay.pp > 1:
            inflight = micro if lay.pp_schedule == "GPipe" else min(micro, lay.pp - stage)
            if lay.pp_schedule not in ("1F1B", "GPipe"):
                inflight *= 1.5
        units = _units(
            a, lay, stage, tokens, ac_mode, ac_option, compiled, compiled_loss, weights == "autocast"
        )
        w = _walk(units, lay, weights, inflight, grad_accum > 1 or micro > 1, reshard, experts_outside)
        p = w["params_local"]
        est = Estimate(
            params=param_bytes * p + a.max_seq_len * a.qk_rope_head_dim * 4,  # + the RoPE table
            grads=(2 if weights == "bf16" else 4) * p,
            optimizer=state_bytes * p,
            weights_bf16=w["weights"],
            activations=w["activations"],
            logits=w["logits"],
            transient=w["transient"],
            grads_at_peak=w["grads"],
            context=CUDA_CONTEXT_BYTES + (NCCL_BYTES if lay.world_size > 1 else 0.0),
            slack=FSDP_ALLOCATOR_SLACK if weights == "fsdp" else ALLOCATOR_SLACK,
            peak_phase=w["phase"],
            stage=stage,
            params_local=int(round(p)),
        )
        if best is None or est.allocated > best.allocated:
            best = est
    return best


def estimate_from_config(cfg, world_size: int, ac_mode: str | None = None) -> Estimate:
    """Estimate for a resolved JobConfig on world_size ranks (ac_mode overrides the config's)."""
    from titan_dsv3.config import resolve_model_args
    from titan_dsv3.parallel.dims import ParallelDims

    args = resolve_model_args(cfg)
    dims = ParallelDims.from_config(cfg.parallelism, world_size)
    t = cfg.training
    global_batch = t.global_batch_size if t.global_batch_size > 0 else t.local_batch_size * dims.dp
    comp = cfg.compile
    return estimate(
        args,
        Layout.from_dims(dims),
        t.local_batch_size,
        t.seq_len,
        grad_accum=global_batch // (t.local_batch_size * dims.dp),
        ac_mode=ac_mode or cfg.activation_checkpoint.mode,
        ac_option=cfg.activation_checkpoint.selective_option,
        compiled=comp.enable and "model" in comp.components,
        compiled_loss=comp.enable and "loss" in comp.components,
        state_dtype=cfg.optimizer.state_dtype,
        bf16_weights=t.mixed_precision == "bf16_weights",
        reshard_after_forward=_reshard(cfg.parallelism.fsdp_reshard_after_forward, dims.pp),
        experts_unit=cfg.parallelism.expert_1rank_fsdp_unit
        and not (comp.enable and "model" in comp.components and comp.moe_one_graph),
        padded_route=cfg.parallelism.expert_route == "padded",
    )


def _reshard(option: str, pp: int) -> bool:
    return {"always": True, "never": False}.get(option, pp == 1)


def format_estimate(est: Estimate) -> str:
    lines = [f"  {name:<30} {value / GiB:8.2f} GiB" for name, value in est.table()]
    lines.append(f"  peak at: {est.peak_phase}" + (f" (pipeline stage {est.stage})" if est.stage else ""))
    return "\n".join(lines)
