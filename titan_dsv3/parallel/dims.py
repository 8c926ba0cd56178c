"""ParallelDims: the [parallelism] degrees, their checks, and the device meshes they imply.

World = pp x dp_replicate x dp_shard x cp x tp, ranks laid out row-major in that order (tp fastest). Expert
parallelism does not multiply the world: the dp_shard x cp x tp ranks of one replica all hold different tokens
inside an MoE (tp ranks through sequence parallelism), and the innermost `ep` of them split the routed experts;
each expert is FSDP-sharded over the rest, efsdp = dp_shard x cp x tp / ep.

Meshes (built by `build_meshes`, one call on every rank):
  world   (pp, dp_replicate, dp_shard, cp, tp) with flattened dims dp_shard_cp (FSDP of dense parameters),
          dp (valid-token counts), loss (pp x dp x cp: loss sums, which only the last stage computes) and
          stage (all ranks of one pipeline stage: MoE token counts)
  sparse  (pp, dp_replicate, efsdp, ep), only when the routed experts are laid out differently from the dense
          parameters (ep > 1 or tp > 1): FSDP of experts over (dp_replicate, efsdp), EP over ep
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from titan_dsv3.parallel.expert_parallel import MAX_LOCAL_EXPERTS

PP_SCHEDULES = ("1F1B", "GPipe", "Interleaved1F1B", "ZBV", "InterleavedZeroBubble")
_MULTI_STAGE = ("Interleaved1F1B", "ZBV", "InterleavedZeroBubble")


@dataclass
class ParallelDims:
    dp_replicate: int
    dp_shard: int
    cp: int
    tp: int
    pp: int
    ep: int
    world_size: int
    pp_schedule: str = "1F1B"
    pp_microbatches: int = 1

    @classmethod
    def from_config(cls, p, world_size: int) -> ParallelDims:
        """From a [parallelism] section; raises ValueError naming the key and the fix."""
        for key in (
            "data_parallel_replicate_degree",
            "tensor_parallel_degree",
            "pipeline_parallel_degree",
            "context_parallel_degree",
            "expert_parallel_degree",
        ):
            if getattr(p, key) < 1:
                raise ValueError(f"parallelism.{key} = {getattr(p, key)} must be >= 1")
        rep, tp, pp, cp, ep = (
            p.data_parallel_replicate_degree,
            p.tensor_parallel_degree,
            p.pipeline_parallel_degree,
            p.context_parallel_degree,
            p.expert_parallel_degree,
        )
        others = rep * tp * pp * cp
        shard = p.data_parallel_shard_degree
        if shard == -1:
            if world_size % others:
                raise ValueError(
                    f"world size {world_size} is not divisible by replicate x tp x pp x cp = {others}; "
                    "change the degrees or the number of processes"
                )
            shard = world_size // others
        if shard < 1:
            raise ValueError(f"parallelism.data_parallel_shard_degree = {shard} must be >= 1 or -1")
        if rep * shard * cp * tp * pp != world_size:
            raise ValueError(
                f"world size {world_size} != replicate {rep} x shard {shard} x cp {cp} x tp {tp} x pp {pp}; "
                "make the degrees multiply to the number of processes (NGPU)"
            )
        if (shard * cp * tp) % ep:
            raise ValueError(
                f"parallelism.expert_parallel_degree = {ep} must divide data_parallel_shard_degree x "
                f"context_parallel_degree x tensor_parallel_degree = {shard * cp * tp} (EP ranks are taken from them)"
            )
        if p.pipeline_parallel_schedule not in PP_SCHEDULES:
            raise ValueError(
                f"parallelism.pipeline_parallel_schedule = {p.pipeline_parallel_schedule!r}; use one of {PP_SCHEDULES}"
            )
        if p.fsdp_reshard_after_forward not in ("default", "always", "never"):
            raise ValueError(
                f"parallelism.fsdp_reshard_after_forward = {p.fsdp_reshard_after_forward!r}; "
                "use default, always or never"
            )
        if p.expert_route not in ("sized", "padded"):
            raise ValueError(f"parallelism.expert_route = {p.expert_route!r}; use sized or padded")
        mbs = p.pipeline_parallel_microbatches
        if mbs == -1:
            mbs = pp
        if mbs < 1:
            raise ValueError(f"parallelism.pipeline_parallel_microbatches = {mbs} must be >= 1 or -1")
        return cls(rep, shard, cp, tp, pp, ep, world_size, p.pipeline_parallel_schedule, mbs)

    def check_model(
        self, args, local_batch_size: int, seq_len: int | None = None, balance_loss_alpha: float = 0.0
    ) -> None:
        """Combinations that depend on the model, the batch and the sequence length."""
        if self.ep > 1 and args.n_routed_experts % self.ep:
            raise ValueError(
                f"model.n_routed_experts = {args.n_routed_experts} is not divisible by "
                f"parallelism.expert_parallel_degree = {self.ep}"
            )
        if self.ep > 1 and args.n_routed_experts // self.ep > MAX_LOCAL_EXPERTS:  # ids travel in bf16
            raise ValueError(
                f"model.n_routed_experts = {args.n_routed_experts} over parallelism.expert_parallel_degree = "
                f"{self.ep} is more than {MAX_LOCAL_EXPERTS} experts a rank; raise expert_parallel_degree"
            )
        if self.ep > 1 and args.n_moe_layers == 0:
            raise ValueError(
                "parallelism.expert_parallel_degree > 1 needs MoE layers (model.n_dense_layers < n_layers)"
            )
        if self.tp > 1:
            shared = args.n_shared_experts * args.moe_inter_dim
            if args.tie_embeddings:
                raise ValueError(
                    "model.tie_embeddings with tensor parallelism is not supported; untie or set tp = 1"
                )
            for key, value in (
                ("n_heads", args.n_heads),
                ("vocab_size", args.vocab_size),
                ("inter_dim", args.inter_dim if args.n_dense_layers > 0 else 0),
                ("n_shared_experts x moe_inter_dim", shared),
            ):
                if value % self.tp:
                    raise ValueError(
                        f"model.{key} = {value} is not divisible by parallelism.tensor_parallel_degree = {self.tp}"
                    )
        if seq_len is not None:
            # CP splits each sequence into 2 x cp load-balanced chunks; sequence parallelism splits what is left by tp
            split = (2 * self.cp if self.cp > 1 else 1) * self.tp
            if seq_len % split:
                raise ValueError(
                    f"training.seq_len = {seq_len} is not divisible by {split} "
                    f"(2 x context_parallel_degree x tensor_parallel_degree); change seq_len or the degrees"
                )
        if self.cp > 1 and args.attn_impl != "sdpa":
            raise ValueError(
                f"parallelism.context_parallel_degree > 1 needs model.attn_impl = 'sdpa' "
                f"(ring attention has no {args.attn_impl!r} backend); set attn_impl = 'sdpa' or context_parallel_degree = 1"
            )
        if balance_loss_alpha > 0 and (self.cp > 1 or self.tp > 1):
            raise ValueError(
                "moe.balance_loss_alpha > 0 is not supported with context or tensor parallelism (each rank sees only "
                "part of a sequence); use moe.bias_update_speed (aux-loss-free balancing) or set the degrees to 1"
            )
        if self.pp > 1:
            stages = self.pp * self.stages_per_rank
            if args.n_layers < stages:
                raise ValueError(
                    f"model.n_layers = {args.n_layers} cannot fill {stages} pipeline stages; "
                    "lower parallelism.pipeline_parallel_degree or use a non-interleaved schedule"
                )
            if local_batch_size % self.pp_microbatches:
                raise ValueError(
                    f"training.local_batch_size = {local_batch_size} is not divisible by "
                    f"parallelism.pipeline_parallel_microbatches = {self.pp_microbatches}"
                )
            if self.pp_schedule in _MULTI_STAGE and self.pp_microbatches % self.pp:
                raise ValueError(
                    f"parallelism.pipeline_parallel_microbatches = {self.pp_microbatches} must be a multiple of "
                    f"pipeline_parallel_degree = {self.pp} for {self.pp_schedule}"
                )

    @property
    def stages_per_rank(self) -> int:
        return 2 if self.pp_schedule in _MULTI_STAGE else 1

    @property
    def dp(self) -> int:
        """Data-parallel degree: how many different micro-batches one step sees side by side."""
        return self.dp_replicate * self.dp_shard

    @property
    def fsdp(self) -> int:
        """FSDP shard degree of the dense parameters: context ranks hold the same weights as data ranks."""
        return self.dp_shard * self.cp

    @property
    def efsdp(self) -> int:
        """FSDP degree of the routed experts: the data x context x tensor ranks left after EP."""
        return self.dp_shard * self.cp * self.tp // self.ep

    @property
    def fsdp_enabled(self) -> bool:
        return self.dp_replicate * self.fsdp > 1

    @property
    def uses_fsdp(self) -> bool:
        """FSDP2 wraps the model when data ranks share parameters, when routed experts are data-parallel over
        tp ranks (efsdp > 1), and under TP (so that every parameter is a DTensor, even over a 1-rank mesh)."""
        return self.fsdp_enabled or self.tp > 1 or (self.separate_experts and self.efsdp > 1)

    @property
    def separate_experts(self) -> bool:
        """Whether routed experts need their own mesh: EP splits them, or TP ranks see different tokens."""
        return self.ep > 1 or self.tp > 1

    def describe(self) -> str:
        """One line for the start-up log."""
        dims = " x ".join(f"{k} {v}" for k, v in self.mesh_shape().items())
        text = f"world {self.world_size} = {dims}"
        if self.ep > 1 or self.tp > 1:
            text += f"; routed experts: ep {self.ep} x efsdp {self.efsdp}"
        if self.pp > 1:
            text += f"; {self.pp_schedule} with {self.pp_microbatches} micro-batches"
        return text

    def coords(self, rank: int) -> dict[str, int]:
        """This rank's index along each mesh dim; ranks are laid out row-major over (pp, dp_replicate, dp_shard, cp, tp)."""
        out = {}
        for name, size in reversed(list(self.mesh_shape().items())):
            rank, out[name] = divmod(rank, size)
        return out

    def mesh_shape(self) -> dict[str, int]:
        return {
            "pp": self.pp,
            "dp_replicate": self.dp_replicate,
            "dp_shard": self.dp_shard,
            "cp": self.cp,
            "tp": self.tp,
        }

    def dp_rank(self, rank: int) -> int:
        """Index of this rank's slice of the global batch (ranks of one TP/CP/PP group share it)."""
        c = self.coords(rank)
        return c["dp_replicate"] * self.dp_shard + c["dp_shard"]

    def build_meshes(self, device_type: str) -> Meshes:
        """Every mesh and process group the parallelisms need (collective: call on every rank)."""
        world = init_device_mesh(
            device_type, tuple(self.mesh_shape().values()), mesh_dim_names=tuple(self.mesh_shape())
        )
        world["dp_shard", "cp"]._flatten("dp_shard_cp")
        world["dp_replicate", "dp_shard"]._flatten("dp")
        world["dp_replicate", "dp_shard", "cp", "tp"]._flatten("stage")
        world["pp", "dp_replicate", "dp_shard", "cp"]._flatten("loss")
        sparse = None
        if self.separate_experts:
            sparse = init_device_mesh(
                device_type,
                (self.pp, self.dp_replicate, self.efsdp, self.ep),
                mesh_dim_names=("pp", "dp_replicate", "efsdp", "ep"),
            )
        return Meshes(self, world, sparse)


class Meshes:
    """The device meshes of one run and the groups of its reductions."""

    def __init__(self, dims: ParallelDims, world: DeviceMesh, sparse: DeviceMesh | None):
        self.dims, self.world, self.sparse = dims, world, sparse

    @property
    def tp(self) -> DeviceMesh:
        return self.world["tp"]

    @property
    def cp(self) -> DeviceMesh:
        return self.world["cp"]

    @property
    def pp(self) -> DeviceMesh:
        return self.world["pp"]

    @property
    def fsdp(self) -> DeviceMesh:
        """Dense parameters: HSDP over (dp_replicate, dp_shard x cp), or FSDP over dp_shard x cp."""
        if self.dims.dp_replicate > 1:
            return self.world["dp_replicate", "dp_shard_cp"]
        return self.world["dp_shard_cp"]

    @property
    def ep(self) -> DeviceMesh:
        return self.sparse["ep"]

    @property
    def efsdp(self) -> DeviceMesh:
        """Routed experts: HSDP over (dp_replicate, efsdp), or FSDP over efsdp."""
        if self.dims.dp_replicate > 1:
            return self.sparse["dp_replicate", "efsdp"]
        return self.sparse["efsdp"]

    def group(self, name: str) -> dist.ProcessGroup:
        """Reduction groups: dp (valid-token counts), loss (loss sums), stage (MoE counts), pp."""
        return self.world[name].get_group()
