"""ModelArgs: every hyperparameter of the DeepSeek-V2/V3 family, and exact parameter and FLOP counts.

Defaults are DeepSeek-V3 671B (the values of its released config.json).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields


@dataclass
class ModelArgs:
    """DeepSeek-V3 architecture hyperparameters; defaults are the 671B model."""

    vocab_size: int = 129280
    """Vocabulary size (embedding rows and output columns)."""
    dim: int = 7168
    """Hidden size of the residual stream."""
    inter_dim: int = 18432
    """Hidden size of the dense SwiGLU layers (the first n_dense_layers)."""
    moe_inter_dim: int = 2048
    """Hidden size of one routed or shared expert."""
    n_layers: int = 61
    """Transformer blocks in the main model (MTP blocks not included)."""
    n_dense_layers: int = 3
    """The first n_dense_layers blocks use a dense SwiGLU instead of MoE."""
    n_heads: int = 128
    """Attention heads."""
    n_routed_experts: int = 256
    """Routed experts per MoE layer."""
    n_shared_experts: int = 1
    """Shared experts per MoE layer (one SwiGLU of width n_shared_experts * moe_inter_dim)."""
    n_activated_experts: int = 8
    """Routed experts chosen per token (top-k)."""
    n_expert_groups: int = 8
    """Expert groups for group-limited routing (1 = plain top-k)."""
    n_limited_groups: int = 4
    """Groups a token may route to."""
    score_func: str = "sigmoid"
    """Router score: softmax (V2) or sigmoid (V3)."""
    group_score: str = "top2_sum"
    """How a group is scored for group-limited routing: max (V2) or top2_sum (V3)."""
    route_norm: bool = True
    """Normalise the top-k gate weights to sum to one (before route_scale)."""
    route_scale: float = 2.5
    """Multiplier on the gate weights (routed_scaling_factor)."""
    capacity_factor: float = 0.0
    """Token dropping: an expert keeps at most capacity_factor * tokens * top_k / experts tokens; 0 = no dropping."""
    q_lora_rank: int = 1536
    """Low-rank query latent; 0 = a plain query projection (V2-Lite)."""
    kv_lora_rank: int = 512
    """Compressed key/value latent (the KV cache)."""
    qk_nope_head_dim: int = 128
    """Per-head query/key dimension without RoPE."""
    qk_rope_head_dim: int = 64
    """Per-head query/key dimension with RoPE (the key part is shared across heads)."""
    v_head_dim: int = 128
    """Per-head value dimension."""
    max_seq_len: int = 4096
    """Longest sequence the RoPE tables cover."""
    original_seq_len: int = 4096
    """Context length of pretraining; YaRN stretches RoPE beyond it."""
    rope_theta: float = 10000.0
    """RoPE base."""
    rope_factor: float = 1.0
    """YaRN scale factor; YaRN is applied when it is above 1 (DeepSeek-V3 extends with 40)."""
    beta_fast: int = 32
    """YaRN: rotations above which frequencies are kept (extrapolated)."""
    beta_slow: int = 1
    """YaRN: rotations below which frequencies are interpolated."""
    mscale: float = 1.0
    """YaRN mscale of the RoPE cos/sin (HF rope_scaling.mscale)."""
    mscale_all_dim: float = 1.0
    """YaRN mscale of the softmax scale (HF rope_scaling.mscale_all_dim); 0 = no softmax correction."""
    norm_eps: float = 1e-6
    """RMSNorm epsilon of the block, final and MTP norms."""
    mtp_depth: int = 0
    """Multi-token prediction modules (DeepSeek-V3 uses 1)."""
    init_std: float = 0.006
    """Standard deviation of the normal weight initialisation (DeepSeek-V3: 0.006)."""
    attn_impl: str = "sdpa"
    """Attention backend: sdpa (causal), flex (document masking of packed sequences), triton (fused MLA kernel)."""
    tie_embeddings: bool = False
    """Share the input embedding with the output head."""

    # ---- derived sizes -------------------------------------------------------------------------------------

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def n_moe_layers(self) -> int:
        return self.n_layers - self.n_dense_layers

    def validate(self) -> None:
        """Raise ValueError naming the field and the fix for an impossible combination."""
        pos = [
            "vocab_size",
            "dim",
            "inter_dim",
            "n_layers",
            "n_heads",
            "kv_lora_rank",
            "qk_rope_head_dim",
            "v_head_dim",
            "max_seq_len",
            "original_seq_len",
        ]
        for name in pos:
            if getattr(self, name) <= 0:
                raise ValueError(f"model.{name} = {getattr(self, name)} must be > 0")
        if not 0 <= self.n_dense_layers <= self.n_layers:
            raise ValueError(
                f"model.n_dense_layers = {self.n_dense_layers} must lie in [0, n_layers={self.n_layers}]"
            )
        if self.qk_rope_head_dim % 2:
            raise ValueError(
                f"model.qk_rope_head_dim = {self.qk_rope_head_dim} must be even (RoPE rotates pairs)"
            )
        if self.score_func not in ("softmax", "sigmoid"):
            raise ValueError(f"model.score_func = {self.score_func!r}; use 'softmax' or 'sigmoid'")
        if self.group_score not in ("max", "top2_sum"):
            raise ValueError(f"model.group_score = {self.group_score!r}; use 'max' or 'top2_sum'")
        if self.attn_impl not in ("sdpa", "flex", "triton"):
            raise ValueError(f"model.attn_impl = {self.attn_impl!r}; use 'sdpa', 'flex' or 'triton'")
        if self.n_moe_layers > 0:
            if self.n_routed_experts <= 0 or self.moe_inter_dim <= 0:
                raise ValueError(
                    "model.n_routed_experts and model.moe_inter_dim must be > 0 when there are MoE layers"
                )
            if not 1 <= self.n_activated_experts <= self.n_routed_experts:
                raise ValueError(
                    f"model.n_activated_experts = {self.n_activated_experts} must lie in "
                    f"[1, n_routed_experts={self.n_routed_experts}]"
                )
            if self.n_routed_experts % self.n_expert_groups:
                raise ValueError(
                    f"model.n_routed_experts = {self.n_routed_experts} is not divisible by "
                    f"model.n_expert_groups = {self.n_expert_groups}; pick a divisor"
                )
            if not 1 <= self.n_limited_groups <= self.n_expert_groups:
                raise ValueError(
                    f"model.n_limited_groups = {self.n_limited_groups} must lie in [1, n_expert_groups={self.n_expert_groups}]"
                )
            per_group = self.n_routed_experts // self.n_expert_groups
            if self.n_expert_groups > 1 and self.group_score == "top2_sum" and per_group < 2:
                raise ValueError(
                    "model.group_score = 'top2_sum' needs at least 2 experts per group; use 'max'"
                )
            if self.n_limited_groups * per_group < self.n_activated_experts:
                raise ValueError(
                    f"model.n_limited_groups * experts per group = {self.n_limited_groups * per_group} is below "
                    f"n_activated_experts = {self.n_activated_experts}; allow more groups"
                )
        if self.rope_factor < 1:
            raise ValueError(f"model.rope_factor = {self.rope_factor} must be >= 1 (1 = no YaRN)")
        if self.mtp_depth < 0:
            raise ValueError(f"model.mtp_depth = {self.mtp_depth} must be >= 0")
        if self.capacity_factor < 0:
            raise ValueError(f"model.capacity_factor = {self.capacity_factor} must be >= 0 (0 = no dropping)")

    # ---- exact counts --------------------------------------------------------------------------------------

    def _attn_params(self) -> int:
        d, h = self.dim, self.n_heads
        if self.q_lora_rank > 0:
            q = d * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * h * self.qk_head_dim
        else:
            q = d * h * self.qk_head_dim
        kv = d * (self.kv_lora_rank + self.qk_rope_head_dim) + self.kv_lora_rank
        kv += self.kv_lora_rank * h * (self.qk_nope_head_dim + self.v_head_dim)
        return q + kv + h * self.v_head_dim * d

    def _moe_params(self, active: bool) -> int:
        d, e = self.dim, self.moe_inter_dim
        experts = self.n_activated_experts if active else self.n_routed_experts
        return 3 * d * e * (experts + self.n_shared_experts) + self.n_routed_experts * d

    def _block_params(self, moe: bool, active: bool) -> int:
        ffn = self._moe_params(active) if moe else 3 * self.dim * self.inter_dim
        return self._attn_params() + ffn + 2 * self.dim

    def _mtp_module_params(self, active: bool) -> int:
        # enorm + hnorm + eh_proj (2d -> d) + one MoE block + its output norm
        return (
            2 * self.dim
            + 2 * self.dim * self.dim
            + self._block_params(self.n_moe_layers > 0, active)
            + self.dim
        )

    def num_params(
        self, active: bool = False, include_mtp: bool = True, include_embedding: bool = True
    ) -> int:
        """Exact parameter count of DeepSeekV3Model; active=True counts only top-k routed experts per MoE layer."""
        blocks = self.n_dense_layers * self._block_params(False, active)
        blocks += self.n_moe_layers * self._block_params(True, active)
        emb = self.vocab_size * self.dim
        head = 0 if self.tie_embeddings else self.vocab_size * self.dim
        total = blocks + self.dim + head + (emb if include_embedding else 0)
        if include_mtp:
            total += self.mtp_depth * self._mtp_module_params(active)
        return total

    def _attn_matmul_params(self) -> int:
        latent_norms = (self.q_lora_rank if self.q_lora_rank > 0 else 0) + self.kv_lora_rank
        return self._attn_params() - latent_norms

    def _ffn_matmul_params(self, moe: bool) -> int:
        if not moe:
            return 3 * self.dim * self.inter_dim
        return self._moe_params(active=True)  # active experts + shared experts + router

    def flops_per_token(self, seq_len: int, causal: bool = True, include_mtp: bool = True) -> float:
        """Training FLOPs per token (forward + backward = 3 x forward).

        Matmuls: 6 x (active matmul weights): attention projections, dense/expert/shared FFNs, router, output
        head (again for every MTP module, which reuses it), MTP eh_proj. No embedding lookup, norms or elementwise.
        Attention: per layer 2 x S x H x (qk_head_dim + v_head_dim) forward for QK^T and PV, x 3 for training.
        causal=False counts the full S x S square, torchtitan's convention (bench6: 4.99 GFLOP/token, as in its
        logs); causal=True counts the lower triangle only (half), the work a causal kernel really does.
        """
        mtp = self.mtp_depth if include_mtp else 0
        moe = self.n_moe_layers > 0
        matmul = self.n_dense_layers * (self._attn_matmul_params() + self._ffn_matmul_params(False))
        matmul += self.n_moe_layers * (self._attn_matmul_params() + self._ffn_matmul_params(True))
        matmul += self.vocab_size * self.dim * (1 + mtp)
        matmul += mtp * (2 * self.dim * self.dim + self._attn_matmul_params() + self._ffn_matmul_params(moe))
        layers = self.n_layers + mtp
        attn = 6 * layers * seq_len * self.n_heads * (self.qk_head_dim + self.v_head_dim)
        if causal:
            attn /= 2
        return 6 * matmul + attn

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelArgs:
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown model fields {sorted(unknown)}; valid: {sorted(names)}")
        return cls(**d)
