"""The Trainer: build_* methods, train_step, train; and main() behind run_train.sh.

torchrun --nproc_per_node N -m titan_dsv3.train --job.config_file train_configs/debug_model.toml
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import resource
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from titan_dsv3.checkpoint.manager import CheckpointError, CheckpointManager
from titan_dsv3.config import ConfigError, JobConfig, parse_args, resolve_model_args
from titan_dsv3.config.budget import steps_for_ratio
from titan_dsv3.data.loader import PackedLoader, load_embedded, load_prepared
from titan_dsv3.data.tokenizer import TextTokenizer
from titan_dsv3.float8 import apply_float8
from titan_dsv3.metrics.gpu_time import gpu_time
from titan_dsv3.metrics.logger import MetricsLogger, moe_stats, peak_flops
from titan_dsv3.models import DeepSeekV3Model
from titan_dsv3.optim import losses
from titan_dsv3.optim.adamw_bf16 import AdamWBF16States
from titan_dsv3.optim.balance import update_expert_bias
from titan_dsv3.optim.lr_scheduler import build_lr_scheduler
from titan_dsv3.optim.optimizer import build_optimizer
from titan_dsv3.parallel import context_parallel as cp_utils
from titan_dsv3.parallel.dims import ParallelDims
from titan_dsv3.parallel.grads import clip_grads_with_norm, grad_norm, norm_weights, settle_grad_layouts
from titan_dsv3.parallel.parallelize import parallelize_model
from titan_dsv3.parallel.pipeline import TiedEmbeddingSync, build_schedule, split_model
from titan_dsv3.parallel.tensor_parallel import loss_parallel_context, plain_loss
from titan_dsv3.parallel.weights import FULL_INIT_MAX_PARAMS, load_full_state_dict, seeded_state_dict


class NonFiniteLossError(RuntimeError):
    """Raised when the loss or gradient norm is NaN/inf and the policy says stop."""


class TrainState:
    """Counters saved with every checkpoint."""

    def __init__(self):
        self.step = 0
        self.tokens_seen = 0
        self.skipped_steps = 0

    def state_dict(self) -> dict:
        return {"step": self.step, "tokens_seen": self.tokens_seen, "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.tokens_seen = int(state["tokens_seen"])
        self.skipped_steps = int(state["skipped_steps"])


def compile_cache_per_rank(rank: int) -> None:
    """Give each rank its own torch.compile cache: TORCHINDUCTOR_CACHE_DIR (or torch's default) + /rank<r>.

    A compiled graph names the process groups it calls, and torch's caches key it without that name. With two TP
    groups (ranks 0-1 named '15', 2-3 named '16' in tests/distributed/test_compile_cache.py) a rerun or resume with
    a shared cache loaded the other group's compiled loss and failed: "Could not resolve the process group
    registered under the name 16". (EP 2 on 4 ranks reran on a shared cache without this failure.)"""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    base = os.environ.get("TORCHINDUCTOR_CACHE_DIR") or default_cache_dir()
    leaf = f"rank{rank}"
    if os.path.basename(os.path.normpath(base)) != leaf:  # a second Trainer in the process keeps it
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(base, leaf)


class Trainer:
    def __init__(self, cfg: JobConfig):
        self.cfg = cfg
        self.init_distributed()
        self.model_args = resolve_model_args(cfg)
        if self.rank == cfg.metrics.log_rank:
            if cfg.job.description:
                print(cfg.job.description, flush=True)
            if cfg.job.print_config:
                resolved = {**dataclasses.asdict(cfg), "model": self.model_args.to_dict()}
                print(json.dumps(resolved, indent=2, default=str), flush=True)
        self.dims = ParallelDims.from_config(cfg.parallelism, self.world_size)
        self.dp_rank = self.dims.dp_rank(self.rank)
        if self.dims.pp > 1 and cfg.validation.enable:
            raise ConfigError("validation.enable is not supported with pipeline parallelism yet; turn it off")
        # every mesh and reduction group of the layout (None in a single process)
        self.meshes = self.dims.build_meshes(self.device.type) if self.world_size > 1 else None
        if self.meshes is not None and self.rank == 0:
            print(f"parallel layout: {self.dims.describe()}", flush=True)
        self.dump_folder = Path(cfg.job.dump_folder)
        self.init_determinism()
        self.build_data()
        self.build_model()
        self.build_optimizer()
        self.state = TrainState()
        self.build_checkpointer()
        self.build_metrics()

    # ---- build ---------------------------------------------------------------------------------------------

    def init_distributed(self) -> None:
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if self.world_size > 1:
            compile_cache_per_rank(self.rank)
        if torch.cuda.is_available():
            self.device = torch.device("cuda", local_rank)
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        if self.world_size > 1 and not dist.is_initialized():
            dist.init_process_group(backend="nccl" if self.device.type == "cuda" else "gloo")
        mp = self.cfg.training.mixed_precision
        if mp == "auto":
            mp = "bf16" if self.device.type == "cuda" else "fp32"
        self.compute_dtype = torch.float32 if mp == "fp32" else torch.bfloat16
        # bf16_weights: the model holds bf16 weights and gradients; the optimizer holds the fp32 masters
        self.bf16_weights = mp == "bf16_weights"

    def init_determinism(self) -> None:
        torch.manual_seed(self.cfg.job.seed)
        if self.cfg.job.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
            if self.device.type == "cuda":
                torch.backends.cudnn.deterministic = True
                torch.backends.cudnn.benchmark = False

    def build_data(self) -> None:
        d, t = self.cfg.data, self.cfg.training
        if d.path:
            self.train_stream = load_prepared(d.path, "train")
            self.val_stream = load_prepared(d.path, "val") if self.cfg.validation.enable else None
        else:
            tok = TextTokenizer(d.tokenizer or None)
            self.train_stream = load_embedded(tok, d.embedded_max_bytes, "train")
            self.val_stream = (
                load_embedded(tok, d.embedded_max_bytes, "val") if self.cfg.validation.enable else None
            )
        if self.train_stream.vocab_size > self.model_args.vocab_size:
            raise ConfigError(
                f"model.vocab_size = {self.model_args.vocab_size} is smaller than the data's tokenizer vocabulary "
                f"({self.train_stream.vocab_size}); raise model.vocab_size"
            )
        if self.val_stream is not None and len(self.val_stream) <= t.seq_len:
            raise ConfigError(
                f"validation.enable: the held-out split of {self.val_stream.name} has {len(self.val_stream)} tokens, "
                "fewer than one sequence; add data or turn validation off"
            )
        global_batch = t.global_batch_size if t.global_batch_size > 0 else t.local_batch_size * self.dims.dp
        self.loader = PackedLoader(
            self.train_stream,
            t.seq_len,
            t.local_batch_size,
            global_batch,
            self.dp_rank,
            self.dims.dp,
            seed=self.cfg.job.seed,
            shuffle=d.shuffle,
        )
        if t.steps > 0:
            self.total_steps = t.steps
        else:
            self.total_steps = steps_for_ratio(
                self.model_args, t.tokens_per_param, self.loader.tokens_per_step
            )

    def build_model(self) -> None:
        """Meta model -> pipeline stages (if PP) -> parallelize each -> materialise -> initial weights."""
        with torch.device("meta"):
            model = DeepSeekV3Model(self.model_args)
        # module swaps keep names: before the split and fully_shard
        float8 = apply_float8(model, self.cfg.float8)
        if float8 and self.rank == self.cfg.metrics.log_rank:
            print(float8, flush=True)
        stage_ids, parts = [0], [model]
        if self.dims.pp > 1:
            stage_ids, parts = split_model(model, self.dims, self.dims.coords(self.rank)["pp"])
        # FSDP keeps fp32 weights and gathers them in bf16 when the run computes in bf16; autocast is then off
        self.fsdp_bf16 = (
            self.dims.uses_fsdp and self.compute_dtype == torch.bfloat16 and not self.bf16_weights
        )
        param_dtype = torch.bfloat16 if self.fsdp_bf16 else torch.float32
        parts = [parallelize_model(p, self.dims, self.meshes, self.cfg, param_dtype) for p in parts]
        for part in parts:
            part.to_empty(device=self.device)
        self.model_parts = parts
        self.model = parts[0]
        self.moes = [m for part in parts for m in part.moe_layers()]
        self.init_weights()
        with torch.no_grad():
            if self.bf16_weights:
                for p in self.model.parameters():  # buffers (expert bias, RoPE table) stay fp32
                    p.data = p.data.to(torch.bfloat16)
        for part in parts:
            part.train()
        global_batch = self.loader.global_batch
        for moe in self.moes:
            moe.balance_loss_scale = self.cfg.moe.balance_loss_alpha / global_batch
        self.loss_sums = losses.loss_sums if self.dims.cp == 1 else cp_utils.stacked_loss_sums
        if self.cfg.compile.enable and "loss" in self.cfg.compile.components:
            self.loss_sums = torch.compile(self.loss_sums)
        tp_loss = self.dims.tp > 1 and self.cfg.parallelism.enable_loss_parallel
        if tp_loss:
            self.loss_sums = plain_loss(self.loss_sums)
        self.loss_context = loss_parallel_context if tp_loss else contextlib.nullcontext
        self.build_pipeline(stage_ids)
        all_params = [p for part in parts for p in part.parameters()]
        self._norm_weights = norm_weights(all_params, self.world_size // self.dims.pp, self.tied.copies())

    def init_weights(self, seed: int | None = None) -> None:
        """The weights one process draws with job.seed, whatever the layout (see parallel/weights.py)."""
        seed = self.cfg.job.seed if seed is None else seed
        if self.model_args.num_params() <= FULL_INIT_MAX_PARAMS:
            self.load_weights(seeded_state_dict(self.model_args, seed))
            return
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(seed)
            for part in self.model_parts:
                part.init_weights(buffer_device=self.device)

    def load_weights(self, full_state: dict[str, torch.Tensor]) -> None:
        """Load a full (unsharded) model state dict into this rank's shards; resets the MoE token counts."""
        load_full_state_dict(self.model_parts, full_state)
        with torch.no_grad():
            for part in self.model_parts:
                part.init_rope(self.device)  # non-persistent buffers
            for moe in self.moes:
                moe.tokens_per_expert.zero_()

    def build_pipeline(self, stage_ids: list[int]) -> None:
        """The pipeline schedule over this rank's stages (PP only), and the tied-embedding gradient sync."""
        self.pp_schedule = None
        self.tied = TiedEmbeddingSync(
            self.model_parts, stage_ids, self.dims, self.meshes.world if self.meshes else None
        )
        if self.dims.pp == 1:
            return
        n_stages = self.dims.pp * self.dims.stages_per_rank
        self.pp_has_first = 0 in stage_ids
        self.pp_has_last = n_stages - 1 in stage_ids
        t = self.cfg.training
        self.pp_schedule = build_schedule(
            self.model_parts,
            stage_ids,
            self.dims,
            self.meshes.pp,
            self.device,
            self._pipeline_loss,
            t.local_batch_size,
            t.seq_len,
            self.compute_dtype,
        )

    def build_optimizer(self) -> None:
        self.optimizer = build_optimizer(self.model_parts, self.cfg.optimizer, self.device.type)
        # clipping folds into the optimizer's grad_scale where it has one: ours (bf16 states) on plain or sharded
        # params; torch's fused AdamW on plain params only (DTensor params take the plain path there)
        plain = all(type(p) is torch.nn.Parameter for part in self.model_parts for p in part.parameters())
        fused = bool(self.optimizer.defaults.get("fused"))
        self._fold_clip_into_adamw = isinstance(self.optimizer, AdamWBF16States) or (fused and plain)
        self.lr_scheduler = build_lr_scheduler(self.optimizer, self.cfg.lr_scheduler, self.total_steps)

    def build_checkpointer(self) -> None:
        self.checkpointer = CheckpointManager(
            self.cfg.checkpoint,
            self.dump_folder,
            model_parts=self.model_parts,
            optimizer=self.optimizer,
            lr_scheduler=self.lr_scheduler,
            dataloader=self.loader,
            train_state=self.state,
            rank=self.rank,
        )

    def build_metrics(self) -> None:
        total_tokens = self.total_steps * self.loader.tokens_per_step
        self.metrics = MetricsLogger(
            self.cfg.metrics, self.dump_folder, self.rank, self.total_steps, total_tokens
        )
        self.flops_per_token = self.model_args.flops_per_token(self.cfg.training.seq_len, causal=False)
        self.flops_per_token_causal = self.model_args.flops_per_token(self.cfg.training.seq_len, causal=True)
        self.peak_flops = peak_flops(self.device, self.compute_dtype)

    # ---- one step ------------------------------------------------------------------------------------------

    def autocast(self):
        if self.compute_dtype == torch.float32 or self.bf16_weights or self.fsdp_bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.compute_dtype)

    def _all_reduce(self, t: torch.Tensor, group: str) -> torch.Tensor:
        """Sum over a reduction group of the layout (parallel/dims.py: dp, loss, stage)."""
        if self.meshes is not None and self.meshes.world[group].size() > 1:
            dist.all_reduce(t, group=self.meshes.group(group))
        return t

    def forward_backward(self, batches) -> tuple[torch.Tensor, torch.Tensor]:
        """Accumulate gradients of sum(loss) / global valid tokens over this rank's micro-batches.

        Ranks of one data-parallel rank (TP, CP, PP) share the batch: the valid-token count sums over dp only.
        With CP, sequences are split after the MTP shifts are taken on whole sequences (context_parallel.py).
        """
        depth = self.model_args.mtp_depth
        n_valid = sum(losses.count_valid(b.labels, depth) for b in batches).to(self.device)
        n_valid = self._all_reduce(n_valid, "dp")
        use_doc_ids = self.model_args.attn_impl != "sdpa"
        sums_total = torch.zeros(1 + depth, dtype=torch.float64, device=self.device)
        for b in batches:
            inputs = b.inputs.to(self.device, non_blocking=True)
            targets = b.labels.to(self.device, non_blocking=True)
            kwargs = {}
            if use_doc_ids:
                kwargs["doc_ids"] = b.doc_ids.to(self.device, non_blocking=True)
            if depth > 0 and (self.dims.pp > 1 or self.dims.cp > 1):
                kwargs["mtp_next_ids"] = cp_utils.mtp_next_ids(inputs, depth)
            if self.dims.cp > 1:
                targets = cp_utils.stacked_targets(targets, depth)
            with self.cp_context([inputs, targets, *kwargs.values()]), self.loss_context():
                if self.pp_schedule is not None:
                    sums = self._pipeline_step(inputs, targets, kwargs, n_valid)
                else:
                    with self.autocast():
                        out = self.model(inputs, **kwargs)
                    sums = self.loss_sums(out, targets)
                    loss = losses.combine(sums, n_valid, self.cfg.mtp.loss_weight)
                    loss.backward()
            sums_total += sums.detach().double()
        self.tied.sync()
        return sums_total, n_valid

    def cp_context(self, buffers: list[torch.Tensor]):
        """With CP: split `buffers` (and the RoPE tables) along the sequence for one forward + backward."""
        if self.dims.cp == 1:
            return contextlib.nullcontext()
        return cp_utils.cp_context(self.meshes.cp, self.model_parts, buffers, [1] * len(buffers))

    def _pipeline_step(self, inputs, targets, kwargs, n_valid) -> torch.Tensor:
        """One local batch through the pipeline schedule; returns the loss sums (zeros off the last stage)."""
        self._pp_n_valid, self._pp_sums = n_valid, []
        args = (inputs,) if self.pp_has_first else ()
        with self.autocast():
            self.pp_schedule.step(*args, target=targets if self.pp_has_last else None, **kwargs)
        if not self._pp_sums:
            return torch.zeros(1 + self.model_args.mtp_depth, dtype=torch.float64, device=self.device)
        return torch.stack(self._pp_sums).sum(0)

    def _pipeline_loss(self, output, targets) -> torch.Tensor:
        # the last stage returns (logits, mtp logits...) flattened; see parallel/pipeline.py
        if isinstance(output, tuple):
            output = output[0] if len(output) == 1 else (output[0], list(output[1:]))
        sums = self.loss_sums(output, targets)
        self._pp_sums.append(sums.detach().double())
        return losses.combine(sums, self._pp_n_valid, self.cfg.mtp.loss_weight)

    def clip_grads(self) -> torch.Tensor:
        """Global grad norm over every mesh and pipeline stage; grads scaled down to training.max_norm when above
        it (0 = no clipping)."""
        params = [p for part in self.model_parts for p in part.parameters() if p.grad is not None]
        max_norm = self.cfg.training.max_norm
        if self.world_size > 1:
            settle_grad_layouts(params)
            norm = grad_norm(params, self._norm_weights)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
        if max_norm <= 0:
            return norm
        if self._fold_clip_into_adamw:
            # The fused AdamW kernel divides each grad by grad_scale as it reads it, so clipping costs no pass
            # of its own over the grads (bench6 on H100: the separate _foreach_mul_ took ~10 ms of a 231 ms step;
            # the 16B shape with FSDP 2 + EP 2 on H200: 17 ms of a 1.13 s step).
            self.optimizer.grad_scale = (norm / max_norm).clamp(min=1.0).float()
        else:
            clip_grads_with_norm(params, max_norm, norm)
        return norm

    def train_step(self) -> dict[str, float]:
        batches = self.loader.next_step()
        sums, n_valid = self.forward_backward(batches)
        sums = self._all_reduce(sums, "loss")
        means = sums / n_valid
        grad_norm = self.clip_grads()
        finite = bool(torch.isfinite(means).all().item() and torch.isfinite(grad_norm).item())
        if finite:
            self.optimizer.step()
            self.state.skipped_steps = 0
        else:
            self.handle_non_finite(means, grad_norm)
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.lr_scheduler.get_last_lr()[0]  # the LR this step's update used
        self.lr_scheduler.step()
        counts = update_expert_bias(
            self.moes, self.cfg.moe.bias_update_speed if finite else 0.0, self._moe_group()
        )
        self.state.step += 1
        self.state.tokens_seen += self.loader.tokens_per_step
        out = {
            "loss": means[0].item(),
            "grad_norm": grad_norm.item(),
            "lr": lr,
            "skipped": 0.0 if finite else 1.0,
        }
        if means.numel() > 1:
            out["mtp_loss"] = means[1:].mean().item()
        self._last_counts = counts
        return out

    def _moe_group(self):
        """All ranks of this pipeline stage: each routes its own tokens through the stage's MoE layers."""
        return self.meshes.group("stage") if self.meshes is not None else None

    def handle_non_finite(self, means: torch.Tensor, grad_norm: torch.Tensor) -> None:
        msg = f"step {self.state.step + 1}: non-finite loss {means[0].item()} or grad norm {grad_norm.item()}"
        if self.cfg.training.nan_policy == "stop":
            raise NonFiniteLossError(f"{msg}; stopping (training.nan_policy = stop)")
        self.state.skipped_steps += 1
        print(
            f"[rank {self.rank}] {msg}; update skipped ({self.state.skipped_steps} in a row)", file=sys.stderr
        )
        if self.state.skipped_steps > self.cfg.training.max_nan_skips:
            raise NonFiniteLossError(
                f"{msg}; {self.state.skipped_steps} steps in a row were skipped, more than "
                f"training.max_nan_skips = {self.cfg.training.max_nan_skips}; stopping"
            )

    # ---- validation and profiling --------------------------------------------------------------------------

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        t = self.cfg.training
        loader = PackedLoader(
            self.val_stream,
            t.seq_len,
            t.local_batch_size,
            self.loader.global_batch,
            self.dp_rank,
            self.dims.dp,
            shuffle=False,
        )
        for part in self.model_parts:
            part.eval()
        ce_sum = torch.zeros(1, dtype=torch.float64, device=self.device)
        n_tokens = torch.zeros(1, dtype=torch.float64, device=self.device)
        for _ in range(self.cfg.validation.steps):
            for b in loader.next_step():
                inputs, labels = b.inputs.to(self.device), b.labels.to(self.device)
                n_tokens += (labels != losses.IGNORE_INDEX).sum()
                with self.cp_context([inputs, labels]), self.loss_context(), self.autocast():
                    out = self.model(inputs)
                    logits = out if isinstance(out, torch.Tensor) else out[0]
                    ce_sum += plain_loss(losses.cross_entropy_sum)(logits, labels).double()
        for part in self.model_parts:
            part.train()
        total = torch.cat([self._all_reduce(ce_sum, "loss"), self._all_reduce(n_tokens, "dp")])
        val_loss = (total[0] / total[1]).item()
        return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))}

    def profiler(self, step: int):
        p = self.cfg.profiling
        if not p.enable_profiling or step % p.profile_freq:
            return contextlib.nullcontext()
        acts = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            acts.append(torch.profiler.ProfilerActivity.CUDA)
        folder = self.dump_folder / p.save_traces_folder / f"iteration_{step}"
        folder.mkdir(parents=True, exist_ok=True)

        def on_trace_ready(prof):
            prof.export_chrome_trace(str(folder / f"rank{self.rank}_trace.json"))
            split = gpu_time(prof.events())
            if split is not None and self.rank == self.cfg.metrics.log_rank:
                print(f"step {step} profiled: {split.summary()}", flush=True)

        return torch.profiler.profile(activities=acts, record_shapes=True, on_trace_ready=on_trace_ready)

    def maybe_memory_snapshot(self, step: int) -> None:
        p = self.cfg.profiling
        if not (p.enable_memory_snapshot and self.device.type == "cuda"):
            return
        if step == 1:
            torch.cuda.memory._record_memory_history(max_entries=100_000)
        if step % p.profile_freq == 0:
            folder = self.dump_folder / p.save_memory_snapshot_folder
            folder.mkdir(parents=True, exist_ok=True)
            torch.cuda.memory._dump_snapshot(str(folder / f"iteration_{step}_rank{self.rank}.pickle"))

    # ---- the loop ------------------------------------------------------------------------------------------

    def memory_gib(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**30
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # peak RSS (KiB on Linux)

    def train(self) -> None:
        self.checkpointer.load()
        log_freq = self.cfg.metrics.log_freq
        t_last, steps_since, skipped = time.perf_counter(), 0, 0.0
        for moe in self.moes:
            moe.record_stats = False
        while self.state.step < self.total_steps:
            step = self.state.step + 1
            log_now = step % log_freq == 0 or step == self.total_steps
            for moe in self.moes:
                moe.record_stats = log_now
            self.maybe_memory_snapshot(step)
            with self.profiler(step):
                out = self.train_step()
            steps_since += 1
            skipped += out["skipped"]
            self.checkpointer.maybe_save(step, last=step == self.total_steps)
            if self.val_stream is not None and step % self.cfg.validation.freq == 0:
                self.metrics.log(step, {**self._scalars(out, 0.0), **self.validate()})
            if log_now:
                elapsed = time.perf_counter() - t_last
                self.metrics.log(
                    step, self._scalars(out, steps_since * self.loader.tokens_per_step / elapsed)
                )
                t_last, steps_since = time.perf_counter(), 0
        self.checkpointer.wait()

    def _scalars(self, out: dict[str, float], tokens_per_second: float) -> dict[str, float]:
        s = dict(out)
        s["tokens_seen"] = float(self.state.tokens_seen)
        s["tokens_per_second"] = tokens_per_second
        s["tokens_per_second_per_device"] = tokens_per_second / self.world_size
        if self.peak_flops:
            s["mfu_pct"] = (
                100 * tokens_per_second * self.flops_per_token / (self.peak_flops * self.world_size)
            )
            s["mfu_causal_pct"] = s["mfu_pct"] * self.flops_per_token_causal / self.flops_per_token
        s["memory_gib"] = self.memory_gib()
        s.update(moe_stats(self.moes, self._last_counts, self.dims.ep))
        bal = [m.last_balance_loss for m in self.moes if m.last_balance_loss is not None]
        if bal:
            s["balance_loss"] = float(torch.stack(bal).mean())
        return s

    def close(self, keep_process_group: bool = False) -> None:
        """Flush checkpoints and metrics; end the process group unless another Trainer in this process follows
        (re-creating a NCCL group under torchrun after destroying one reads the first group's stale rendezvous)."""
        self.checkpointer.close()
        self.metrics.close()
        if dist.is_initialized() and not keep_process_group:
            dist.barrier()
            dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_args(argv)
        trainer = Trainer(cfg)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    try:
        trainer.train()
    except (NonFiniteLossError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    finally:
        trainer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
