"""ParallelDims: the [parallelism] degrees, their checks, and the device meshes they imply.

World = dp_replicate x dp_shard x cp x tp x pp. Expert parallelism does not multiply the world: its ranks are
taken from dp_shard x cp, and each expert is FSDP-sharded over the rest (efsdp = dp_shard x cp / ep).
"""

from __future__ import annotations

from dataclasses import dataclass

PP_SCHEDULES = ("1F1B", "GPipe", "Interleaved1F1B", "ZBV", "InterleavedZeroBubble")


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
        if (shard * cp) % ep:
            raise ValueError(
                f"parallelism.expert_parallel_degree = {ep} must divide data_parallel_shard_degree x "
                f"context_parallel_degree = {shard * cp} (EP ranks are taken from them)"
            )
        if p.pipeline_parallel_schedule not in PP_SCHEDULES:
            raise ValueError(
                f"parallelism.pipeline_parallel_schedule = {p.pipeline_parallel_schedule!r}; use one of {PP_SCHEDULES}"
            )
        mbs = p.pipeline_parallel_microbatches
        if mbs == -1:
            mbs = pp
        if mbs < 1:
            raise ValueError(f"parallelism.pipeline_parallel_microbatches = {mbs} must be >= 1 or -1")
        return cls(rep, shard, cp, tp, pp, ep, world_size, p.pipeline_parallel_schedule, mbs)

    def check_model(self, args, local_batch_size: int) -> None:
        """Combinations that depend on the model and batch sizes."""
        if self.ep > 1 and args.n_routed_experts % self.ep:
            raise ValueError(
                f"model.n_routed_experts = {args.n_routed_experts} is not divisible by "
                f"parallelism.expert_parallel_degree = {self.ep}"
            )
        if self.tp > 1 and args.n_heads % self.tp:
            raise ValueError(
                f"model.n_heads = {args.n_heads} is not divisible by parallelism.tensor_parallel_degree = {self.tp}"
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
            if self.pp_schedule in ("Interleaved1F1B", "InterleavedZeroBubble") and self.pp_microbatches % self.pp:
                raise ValueError(
                    f"parallelism.pipeline_parallel_microbatches = {self.pp_microbatches} must be a multiple of "
                    f"pipeline_parallel_degree = {self.pp} for {self.pp_schedule}"
                )

    @property
    def stages_per_rank(self) -> int:
        return 2 if self.pp_schedule in ("Interleaved1F1B", "ZBV", "InterleavedZeroBubble") else 1

    @property
    def dp(self) -> int:
        """Data-parallel degree: how many different micro-batches one step sees side by side."""
        return self.dp_replicate * self.dp_shard

    @property
    def efsdp(self) -> int:
        """FSDP degree of the routed experts: the data x context ranks left after EP."""
        return self.dp_shard * self.cp // self.ep

    def coords(self, rank: int) -> dict[str, int]:
        """This rank's index along each mesh dim; ranks are laid out row-major over (pp, dp_replicate, dp_shard, cp, tp)."""
        out = {}
        for name, size in reversed(list(self.mesh_shape().items())):
            rank, out[name] = divmod(rank, size)
        return out

    def mesh_shape(self) -> dict[str, int]:
        return {"pp": self.pp, "dp_replicate": self.dp_replicate, "dp_shard": self.dp_shard, "cp": self.cp, "tp": self.tp}

    def dp_rank(self, rank: int) -> int:
        """Index of this rank's slice of the global batch (ranks of one TP/CP/PP group share it)."""
        c = self.coords(rank)
        return c["dp_replicate"] * self.dp_shard + c["dp_shard"]
