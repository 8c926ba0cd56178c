"""One dataclass per TOML section. Each field's one-line docstring is its --help text."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, make_dataclass

from titan_dsv3.models.args import ModelArgs


@dataclass
class Job:
    config_file: str = ""
    """TOML file to read (defaults < TOML < command line)."""
    dump_folder: str = "./outputs"
    """Run folder: metrics.jsonl, TensorBoard events, checkpoints, traces."""
    description: str = ""
    """Free text shown at start-up."""
    seed: int = 0
    """Seed of the weight init, data order and dropout-free RNG streams."""
    deterministic: bool = False
    """Deterministic algorithms (for tests; slower on GPU)."""
    print_config: bool = False
    """Print the resolved configuration at start-up."""


# [model]: a preset name plus every ModelArgs field (one source of names, types and docs: models/args.py).
# A field left None comes from the preset; without a preset every field must be set.
Model = make_dataclass(
    "Model",
    [("preset", str, field(default=""))]
    + [(f.name, f"{f.type} | None", field(default=None)) for f in fields(ModelArgs)],
)
Model.__doc__ = "The [model] section: preset + ModelArgs fields."
MODEL_PRESET_DOC = "A TOML file (path, or name in train_configs/) whose [model] section gives the sizes; fields set here override it."


@dataclass
class Training:
    steps: int = -1
    """Optimizer steps; -1 derives them from training.tokens_per_param (Chinchilla)."""
    tokens_per_param: float = 20.0
    """Token budget r: tokens = r x active parameters, used when training.steps is -1."""
    seq_len: int = 2048
    """Tokens per sequence."""
    local_batch_size: int = 8
    """Sequences per micro-batch on one data-parallel rank."""
    global_batch_size: int = -1
    """Sequences per optimizer step over all ranks; -1 = local_batch_size x data-parallel degree (no accumulation)."""
    mixed_precision: str = "auto"
    """bf16 | fp32 | bf16_weights | auto (bf16 on CUDA, fp32 on CPU). bf16: bf16 compute, fp32 weights and grads;
    bf16_weights: bf16 weights and grads, fp32 masters in the optimizer (needs optimizer.state_dtype bfloat16)."""
    max_norm: float = 1.0
    """Gradient clipping by global norm; 0 turns it off."""
    nan_policy: str = "skip"
    """On a NaN/inf loss or grad norm: skip (drop the step's update, keep going) or stop (exit with an error)."""
    max_nan_skips: int = 10
    """With nan_policy skip: stop after this many consecutive skipped steps."""


@dataclass
class Optimizer:
    name: str = "AdamW"
    """Only AdamW is implemented."""
    lr: float = 2.2e-4
    """Peak learning rate (DeepSeek-V3 pretraining: 2.2e-4)."""
    beta1: float = 0.9
    """Adam beta1."""
    beta2: float = 0.95
    """Adam beta2."""
    eps: float = 1e-8
    """Adam epsilon."""
    weight_decay: float = 0.1
    """Decoupled weight decay of matrices (DeepSeek-V3: 0.1)."""
    decay_norms_and_biases: bool = False
    """Also decay norm weights and biases."""
    decay_embeddings: bool = False
    """Also decay the embedding."""
    implementation: str = "auto"
    """auto | fused | foreach | for_loop (auto: fused on CUDA, foreach elsewhere); fp32 moments only."""
    state_dtype: str = "float32"
    """float32 | bfloat16: dtype of Adam's two moments; bfloat16 saves 4 bytes a parameter (DeepSeek-V3 3.3.2)."""


@dataclass
class LRScheduler:
    warmup_steps: int = 200
    """Linear warm-up steps from lr x warmup_start_ratio to lr."""
    warmup_start_ratio: float = 0.0
    """LR at step 0 as a fraction of the peak."""
    decay_type: str = "cosine"
    """cosine | linear | wsd (warmup-stable-decay) after warm-up, down to min_lr_ratio x lr."""
    decay_ratio: float = 0.2
    """wsd only: fraction of all steps spent in the final (linear) decay."""
    min_lr_ratio: float = 0.1
    """LR floor as a fraction of the peak."""


@dataclass
class MoE:
    bias_update_speed: float = 0.001
    """Aux-loss-free balancing: gamma, the step of the expert-bias update (DeepSeek-V3: 0.001); 0 = off."""
    balance_loss_alpha: float = 0.0
    """Sequence-wise balance loss weight alpha (DeepSeek-V3: 0.0001); 0 = off."""


@dataclass
class MTP:
    loss_weight: float = 0.3
    """lambda: weight of the mean MTP loss (DeepSeek-V3: 0.3, then 0.1). Depth is model.mtp_depth."""


@dataclass
class Parallelism:
    data_parallel_replicate_degree: int = 1
    """HSDP replicas (groups holding full copies, sharded inside)."""
    data_parallel_shard_degree: int = -1
    """FSDP2 shard degree; -1 = whatever the other degrees leave."""
    tensor_parallel_degree: int = 1
    """Tensor + sequence parallel degree."""
    pipeline_parallel_degree: int = 1
    """Pipeline stages (one per rank group)."""
    pipeline_parallel_schedule: str = "1F1B"
    """1F1B | GPipe | Interleaved1F1B | ZBV (ZBVZeroBubble) | InterleavedZeroBubble."""
    pipeline_parallel_microbatches: int = -1
    """Micro-batches per local batch in the pipeline; -1 = the pipeline degree."""
    context_parallel_degree: int = 1
    """Context parallel degree (sequence split for long context)."""
    expert_parallel_degree: int = 1
    """Expert parallel degree, carved out of the data (x context) ranks."""
    enable_loss_parallel: bool = True
    """With TP: compute the loss on vocab-sharded logits."""
    fsdp_reshard_after_forward: str = "default"
    """default | always | never: free gathered FSDP params after forward (default: yes, except for PP)."""
    expert_route: str = "sized"
    """sized | padded: how EP exchanges tokens. sized: each rank sends a peer only the tokens routed there, sizes
    read on the host once a MoE layer (all_to_all takes host sizes). padded: every rank sends every peer T rows
    (its token count), so nothing is read on the host and a compiled MoE block is one graph; the exchanges carry
    1.01x the bytes at EP 2 (1.20x at EP 4) but the grouped GEMM's input and kept activations are sized for the
    worst case, EP times the expected copies (tools/memory.py counts it)."""
    expert_1rank_fsdp_unit: bool = True
    """When EP takes every data rank, the routed experts' FSDP mesh has one rank. true: they get an FSDP unit anyway,
    which frees their bf16 copies after forward. false: no unit (fp32 DTensors on the EP mesh, cast in the grouped
    GEMM), so no gather and reduce copies: 4.5% faster on the 16B shape cut to 14 layers (2 x H200, no AC), but each
    non-checkpointed MoE layer keeps its bf16 expert weights from forward to backward (+6.2 GiB there).
    compile.moe_one_graph implies false."""


@dataclass
class Checkpoint:
    enable: bool = False
    """Save and resume checkpoints."""
    folder: str = "checkpoint"
    """Checkpoint folder, relative to job.dump_folder."""
    interval: int = 500
    """Save every N steps (and at the last step)."""
    keep_latest_k: int = 0
    """Keep the newest k checkpoints (0 = keep all)."""
    async_mode: str = "disabled"
    """disabled | async: save in a background thread after a copy to host memory."""
    load_step: int = -1
    """Resume from this step; -1 = the newest complete checkpoint."""
    model_only: bool = False
    """At the last step write only model weights (in export_dtype), e.g. for release."""
    export_dtype: str = "float32"
    """float32 | bfloat16: dtype of a model_only export."""
    initial_load_path: str = ""
    """Start from these weights when no checkpoint exists: a DCP folder (seed checkpoint) or an HF folder."""


@dataclass
class ActivationCheckpoint:
    mode: str = "none"
    """none | full | selective."""
    selective_option: str = "op"
    """selective only: 'op' (save matmul outputs, recompute the rest) or an integer n (checkpoint every n-th block).
    With expert parallelism and compile, 'op' leaves the checkpointed MoE blocks uncompiled; an integer or 'full'
    keeps them compiled (parallel/parallelize.py: apply_compile)."""


@dataclass
class Compile:
    enable: bool = False
    """torch.compile each block (and the loss)."""
    components: list[str] = field(default_factory=lambda: ["model", "loss"])
    """What to compile: model (per block), loss."""
    moe_one_graph: bool = False
    """With expert parallelism: read the route's split sizes inside the compiled graph, and when EP spans every
    data rank leave the routed experts out of FSDP (a 1-rank unit shards nothing), so that a MoE block compiles
    to one graph instead of about 11. On 16B with 2 GPUs it ran 4.4% slower with 5.9 GiB more memory
    (benchmarks/RESULTS.md), hence off by default."""


@dataclass
class Float8:
    enable: bool = False
    """Train dense linears in float8 through torchao (needs CUDA with SM89+)."""
    recipe: str = "tensorwise"
    """tensorwise | rowwise (torchao Float8LinearConfig recipes)."""
    min_dim: int = 1024
    """Skip linears with a dimension below this (too small to gain)."""
    filter_fqns: list[str] = field(default_factory=lambda: ["output", "gate"])
    """Linears whose name contains one of these stay in high precision."""
    fsdp_float8_all_gather: bool = False
    """tensorwise only: FSDP all-gathers the converted linears' weights in float8 (half the bytes)."""
    linear_backend: str = "torchao"
    """torchao | titan: the dense linears on torchao's float8 linears (recipe) or on ours (kernels/fp8_linear.py,
    tensorwise; one device or data parallel). Ours measured no faster on bench6 (H100, benchmarks/RESULTS.md)."""
    output_head: bool = False
    """Run the output head's three GEMMs in FP8 (kernels/fp8_linear.py: tensorwise, e4m3 operands, e5m2
    gradient); one device or data parallel. Keep 'output' in filter_fqns. bench6 in FP8 1.105x -> 1.156x bf16
    (H100, benchmarks/RESULTS.md)."""
    fuse_head_loss: bool = False
    """With output_head: the head and its cross-entropy as one op (kernels/fp8_head_loss.py: no bf16 logits'
    gradient, no amax pass; the model hands the loss the head's input and weight). One device or data parallel,
    no pipeline or context parallelism. Not yet timed on a GPU (predicted: about 5 ms of bench6's FP8 step)."""
    moe_experts: bool = False
    """Run the routed experts in FP8 (kernels/fp8_grouped_gemm.py, DeepSeek-V3 1x128 / 128x128 scaling); CUDA.
    1.33-1.36x bf16 on bench6's expert FFN, 1.11x end to end with float8.enable (H200, benchmarks/RESULTS.md)."""
    fuse_moe_route: bool = False
    """With moe_experts, routed on one device (no expert parallelism): the copies' gather, their return to token
    order and the weighted sum inside the FP8 op (kernels/fp8_routed_experts.py: four N x D tensors a layer less
    through memory). Not yet timed on a GPU (predicted: about 1 ms a bench6 MoE layer)."""


@dataclass
class Kernels:
    pass


@dataclass
class Metrics:
    log_freq: int = 10
    """Log every N steps (console, TensorBoard, metrics.jsonl)."""
    enable_tensorboard: bool = True
    """Write TensorBoard events to <dump_folder>/tb."""
    enable_jsonl: bool = True
    """Write <dump_folder>/metrics.jsonl, one object per logged step."""
    log_rank: int = 0
    """Rank that logs."""


@dataclass
class Data:
    path: str = ""
    """Prepared token-shard folder (tools.prepare_data output); empty = the embedded standard-library corpus."""
    tokenizer: str = ""
    """tokenizer.json for the embedded corpus; empty = the shipped default (2,048 tokens)."""
    embedded_max_bytes: int = 6_000_000
    """Text taken from the embedded corpus (bytes)."""
    shuffle: bool = True
    """Shuffle sequence windows each epoch (seeded by job.seed and the epoch)."""


@dataclass
class Validation:
    enable: bool = False
    """Evaluate on the held-out split every validation.freq steps."""
    freq: int = 100
    """Steps between evaluations."""
    steps: int = 10
    """Batches per evaluation."""


@dataclass
class Profiling:
    enable_profiling: bool = False
    """Write torch profiler traces."""
    profile_freq: int = 100
    """Trace one step every N steps."""
    save_traces_folder: str = "profile_traces"
    """Trace folder, relative to job.dump_folder."""
    enable_memory_snapshot: bool = False
    """Write CUDA memory snapshots (pickles for pytorch.org/memory_viz)."""
    save_memory_snapshot_folder: str = "memory_snapshot"
    """Snapshot folder, relative to job.dump_folder."""


@dataclass
class JobConfig:
    job: Job = field(default_factory=Job)
    model: Model = field(default_factory=Model)
    training: Training = field(default_factory=Training)
    optimizer: Optimizer = field(default_factory=Optimizer)
    lr_scheduler: LRScheduler = field(default_factory=LRScheduler)
    moe: MoE = field(default_factory=MoE)
    mtp: MTP = field(default_factory=MTP)
    parallelism: Parallelism = field(default_factory=Parallelism)
    checkpoint: Checkpoint = field(default_factory=Checkpoint)
    activation_checkpoint: ActivationCheckpoint = field(default_factory=ActivationCheckpoint)
    compile: Compile = field(default_factory=Compile)
    float8: Float8 = field(default_factory=Float8)
    kernels: Kernels = field(default_factory=Kernels)
    metrics: Metrics = field(default_factory=Metrics)
    data: Data = field(default_factory=Data)
    validation: Validation = field(default_factory=Validation)
    profiling: Profiling = field(default_factory=Profiling)
