"""Typed configuration: one dataclass per concern.

Every field has a type the loader enforces and a default; `validate()` in
validate.py checks the combinations. Each component receives only its own
section (model code gets ModelConfig, the data pipeline DataConfig, ...).
"""
from dataclasses import dataclass, field
from typing import List, Literal, Optional


@dataclass
class MLAConfig:
    """DeepSeek multi-head latent attention (Megatron-Core MLASelfAttention)."""
    q_lora_rank: Optional[int] = None      # None: queries projected directly
    kv_lora_rank: int = 64
    qk_head_dim: int = 32                  # non-rotary part of q/k per head
    qk_pos_emb_head_dim: int = 16          # rotary part of q/k per head (shared key)
    v_head_dim: int = 32
    rope_type: Literal["rope", "yarn"] = "rope"
    rotary_base: float = 10000.0
    rotary_scaling_factor: float = 1.0     # yarn only
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0


@dataclass
class PEERConfig:
    """Parameter Efficient Expert Retrieval (He 2024)."""
    num_experts: List[int] = field(default_factory=lambda: [32, 32])  # product-key sizes
    heads: int = 4
    topk: int = 8                          # experts per head
    subkey_topk: Optional[int] = None      # candidates kept per sub-key set (default: topk)
    key_dim: int = 64                      # query/key dimension, split over the sub-key sets
    query_norm: Literal["layernorm", "rmsnorm", "batchnorm", "none"] = "layernorm"
    score_fn: Literal["softmax", "sigmoid"] = "softmax"
    activation: Literal["gelu", "relu", "silu"] = "gelu"
    expert_hidden: int = 1                 # 1 = single-neuron experts
    init_std: Optional[float] = None       # table init std (default: model.init_method_std)
    kernel: Literal["auto", "reference", "fused", "grouped", "gmm"] = "auto"
    # Retrieval's product-key top-k (both rank fp32 sums of the sub-key scores): 'torch'
    # torch.topk per stage; 'triton' one kernel for two sub-key sets (ops/product_topk.py);
    # 'auto' triton on a GPU with Triton and two sub-key sets, else torch
    topk_kernel: Literal["auto", "torch", "triton"] = "auto"
    # Add the tables' gradients to Megatron's fp32 main_grad inside the backward kernels
    # (no bf16 table gradient, no separate add; ops/grad_accum.py).
    grad_accum_fusion: bool = True
    # Grouped kernels, expert-ordered form: compute the tables' gradients once per this
    # many micro-batches of a step (their inputs kept in memory meanwhile; ops/table_grads.py).
    defer_table_grads: int = 1


@dataclass
class ModelConfig:
    num_layers: int = 4
    hidden_size: int = 128
    num_attention_heads: int = 4
    ffn_hidden_size: int = 512             # dense SwiGLU layers
    vocab_size: int = 4096                 # padded to a multiple of 128 * tp
    seq_length: int = 256
    # One letter per layer: 'D' dense SwiGLU MLP, 'P' PEER. A shorter pattern repeats.
    layer_pattern: str = "DP"
    norm_epsilon: float = 1e-6
    init_method_std: float = 0.02
    untie_embeddings_and_output_weights: bool = True
    attention_backend: Literal["auto", "te", "local"] = "auto"
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0
    mla: MLAConfig = field(default_factory=MLAConfig)
    peer: PEERConfig = field(default_factory=PEERConfig)


@dataclass
class ParallelConfig:
    tensor: int = 1
    pipeline: int = 1
    virtual_pipeline: Optional[int] = None  # interleaved 1F1B stages per rank
    expert: int = 1                         # PEER tables sharded by rows over this group
    sequence_parallel: bool = False
    # data parallel = world_size / (tensor * pipeline); the expert group lies inside it


@dataclass
class TokenizerConfig:
    type: Literal["sentencepiece", "huggingface"] = "sentencepiece"
    path: str = ""                         # .model file or a Hugging Face tokenizer folder


@dataclass
class DataConfig:
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    # Weighted blend: [weight, prefix, weight, prefix, ...] or [prefix]. Split by `split`.
    blend: List[str] = field(default_factory=list)
    # Or one blend per split (each like `blend`); these take precedence when set.
    train_blend: List[str] = field(default_factory=list)
    valid_blend: List[str] = field(default_factory=list)
    test_blend: List[str] = field(default_factory=list)
    split: str = "98,1,1"
    seed: int = 1234
    cache_dir: Optional[str] = None
    num_workers: int = 0


@dataclass
class TrainingConfig:
    micro_batch_size: int = 4
    global_batch_size: int = 8
    train_iters: int = 100
    lr: float = 3e-4
    min_lr: float = 3e-5
    lr_schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_iters: int = 10
    wsd_decay_fraction: float = 0.2        # last fraction of steps decays (wsd)
    weight_decay: float = 0.1
    peer_weight_decay: Optional[float] = None  # PEER tables (default: weight_decay)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    seed: int = 1234
    deterministic: bool = False            # bitwise-repeatable runs (torch's deterministic algorithms)
    recompute: Literal["none", "selective", "full"] = "none"
    compile: bool = False                  # torch.compile each transformer layer
    compile_mode: Literal["default", "reduce-overhead", "max-autotune-no-cudagraphs"] = "default"
    use_distributed_optimizer: bool = False
    fused_adam: bool = True                # torch's fused Adam kernel for GPU parameters
    triton_grad_add: bool = True           # main_grad += grad by a Triton kernel on GPUs (ops/grad_add.py)
    # AdamW + bf16 copy in one Triton pass for large fp32 main parameters on GPUs (ops/adam.py;
    # not with use_distributed_optimizer, whose shards torch's Adam steps)
    triton_adam: bool = True
    fused_cross_entropy: bool = False      # Megatron's fused vocab-parallel cross-entropy (bf16)
    overlap_grad_reduce: bool = False
    eval_interval: int = 50
    eval_iters: int = 5
    max_consecutive_nonfinite: int = 5
    exit_interval: int = 0                 # > 0: save and stop after a step that is a multiple


@dataclass
class WandbConfig:
    enabled: bool = False
    mode: Literal["offline", "online", "disabled"] = "offline"
    project: str = "megapeer"
    entity: Optional[str] = None
    name: Optional[str] = None


@dataclass
class LoggingConfig:
    run_dir: str = "runs/default"
    log_interval: int = 10
    expert_usage_interval: int = 50
    tensorboard: bool = False
    peak_tflops: Optional[float] = None    # per device, for MFU (default: by GPU name)
    profile_steps: Optional[List[int]] = None  # [first, last]: torch.profiler over these steps
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class CheckpointConfig:
    dir: Optional[str] = None              # default: <run_dir>/checkpoints
    save_interval: int = 0                 # 0: only at the end and on signals
    save: bool = True                      # false: never write checkpoints (benchmarks)
    keep_last: int = 3
    resume: str = "auto"                   # auto | none | a checkpoint folder
    save_on_signal: bool = True


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
