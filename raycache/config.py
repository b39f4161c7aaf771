"""Typed configuration shared by the CLI, the Ray jobs and the Serve service.

One YAML file (see ``raycache/default_config.yaml``) holds a section per stage; every field can be
overridden by a CLI flag of the same name (``--batch-size 64`` for ``batch_size``). Each stage's
``run(cfg)`` takes exactly one of the models below, so a job script, a CLI subcommand and a test
all build the same object.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A configuration file or flag is invalid; the message names the field."""


class _Base(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class EncoderConfig(_Base):
    """Which sentence encoder to use and how to run it."""

    model: Optional[str] = Field(
        None, description="Model folder or hub id; None = the embedded all-MiniLM-L6-v2."
    )
    max_length: Optional[int] = Field(
        None, ge=8, le=8192, description="Max tokens embedded per prompt; None = the model's window "
        "(256 for all-MiniLM-L6-v2). The cache never serves a semantic hit on a longer prompt unless "
        "its text beyond the window matches exactly.")
    batch_size: int = Field(64, ge=1, description="Prompts per forward pass.")
    device: str = Field("auto", description="'auto' (cuda if present), 'cpu' or 'cuda[:N]'.")
    precision: Literal["fp32", "int8"] = Field("fp32", description=(
        "Inference precision: int8 = dynamic int8 quantisation of the Linear layers (CPU only, "
        "~3.5x faster, lossy: check the false-hit rate on your stream; never for training)."))


class GenerateConfig(_Base):
    """The embedded default workload (see raycache.workload)."""

    out: str = Field("runs/data", description="Output folder for prompts/pairs/stream JSONL.")
    seed: int = 0
    n_train_pairs: int = Field(4000, ge=10)
    n_test_pairs: int = Field(1500, ge=10)
    n_arrivals: int = Field(5000, ge=10, description="Arrivals of the test-split stream (stream.jsonl).")
    n_val_pairs: int = Field(600, ge=10, description="Pairs of the val split (validation while training).")
    n_val_arrivals: int = Field(2000, ge=10, description=(
        "Arrivals of the val-split stream (stream_val.jsonl): where thresholds are chosen."))
    holdout_phrasings: bool = Field(True, description=(
        "Write val/test prompts with phrasing templates the train split never uses."))


class ReadConfig(_Base):
    """How to read an input table (shared by every stage that reads one)."""

    columns: Optional[str] = Field(None, description="Column mapping 'ours=theirs,...'.")
    skip_invalid: bool = Field(False, description="Count and skip invalid rows instead of failing.")


class MineConfig(_Base):
    """Candidate pair mining: k nearest neighbours under the base encoder plus random pairs."""

    prompts: str = Field(..., description="Prompt file or folder (prompt[, answers, group]).")
    out: str = Field(..., description="Output pair file (.parquet or .jsonl).")
    encoder: EncoderConfig = EncoderConfig()
    read: ReadConfig = ReadConfig()
    k: int = Field(5, ge=1, description="Nearest neighbours per prompt.")
    random_per_prompt: float = Field(1.0, ge=0, description="Random pairs per prompt (expected).")
    min_similarity: float = Field(-1.0, description="Drop kNN pairs below this cosine.")
    num_actors: Optional[int] = Field(
        None, ge=1, description="Embedding actors (1 thread each); None = sized for the cluster "
        "(one multi-threaded actor per 4 CPUs, leaving Ray Data a CPU to read with).")
    seed: int = 0


class LabelConfig(_Base):
    """Teacher labeling of candidate pairs."""

    pairs: str = Field(..., description="Pair file or folder (prompt_a, prompt_b[, answers_*, group_*]).")
    out: str = Field(..., description="Output folder of Parquet shards (resumable).")
    read: ReadConfig = ReadConfig()
    teacher: Literal["reference", "hf", "openai", "vllm"] = "reference"
    teacher_model: Optional[str] = Field(None, description="Model folder/hub id (hf, vllm) or name (openai).")
    endpoint: Optional[str] = Field(None, description="OpenAI-compatible base URL (openai backend).")
    api_key_env: str = Field("OPENAI_API_KEY", description="Env var holding the endpoint's API key.")
    batch_size: int = Field(64, ge=1)
    concurrency: int = Field(1, ge=1, description="Actors (hf/vllm) or in-flight requests (openai).")
    timeout_s: float = Field(60.0, gt=0)
    max_retries: int = Field(5, ge=0)
    max_error_rate: float = Field(0.05, ge=0, le=1, description="Fail the job above this error rate.")
    tensor_parallel_size: int = Field(1, ge=1)
    max_model_len: int = Field(2048, ge=64)
    max_prompt_chars: int = Field(4000, ge=16, description="Longer pairs get error='context too long'.")
    device: str = Field("auto", description="hf teacher: 'auto' (cuda if the node has one), 'cpu', 'cuda[:N]'.")
    top_logprobs: int = Field(20, ge=1, le=20, description="openai/vllm: alternatives returned per token.")
    backoff_s: float = Field(1.0, ge=0, description="openai: first retry delay, s (doubles; Retry-After wins).")
    rows_per_shard: int = Field(10_000, ge=1, description="Rows per output Parquet shard (unit of resume).")
    retry_errors: bool = Field(False, description="On resume, relabel pairs whose earlier attempt failed.")


class TrainConfig(_Base):
    """Distillation fine-tuning of the encoder (Ray Train TorchTrainer)."""

    pairs: str = Field(..., description="Labelled training pairs (prompt_a, prompt_b, label).")
    val_pairs: Optional[str] = Field(None, description="Held-out labelled pairs for per-epoch AUC.")
    out: str = Field(..., description="Output folder: model/, checkpoints, train_metrics.json, plot.")
    encoder: EncoderConfig = EncoderConfig()
    read: ReadConfig = ReadConfig()
    loss: Literal["bce", "sld"] = "bce"
    negative_weight: float = Field(
        3.0, gt=0, description="Weight of a negative pair's loss term relative to a positive's "
        "(a false hit costs more than a miss).")
    contrastive_weight: float = Field(
        1.0, ge=0, description="Weight of the in-batch contrastive term (each positive pair against "
        "the batch's other prompts); 0 = off.")
    contrastive_scale: float = Field(20.0, gt=0, description="Scale 1/τ of the contrastive term's cosines.")
    hard_negatives: int = Field(
        0, ge=0, description="Per training prompt, add up to this many nearest prompts from other "
        "components of the pair graph as negative pairs (the decision region); 0 = off.")
    hard_negative_min_cos: float = Field(
        0.8, ge=-1, le=1, description="Only neighbours at least this similar become hard negatives.")
    epochs: int = Field(3, ge=1, description="At most this many passes over the training pairs.")
    early_stopping_patience: int = Field(
        1, ge=0, description="Stop after this many epochs without a better select_metric; 0 = never.")
    select_metric: Literal["hit_at_fh", "tpr_at_fpr", "auc"] = Field(
        "hit_at_fh", description="Validation figure that picks the checkpoint and stops early: "
        "hit_at_fh = correct-hit rate at false-hit <= select_delta, each validation prompt looked up "
        "against all others; tpr_at_fpr = mean TPR at FPR 1/2/5%; auc = ROC-AUC.")
    select_delta: float = Field(0.02, gt=0, lt=1, description="False-hit budget of select_metric hit_at_fh.")
    val_fraction: float = Field(
        0.15, gt=0, lt=0.9, description="Without --val-pairs: share of pairs held out for validation, "
        "question-disjoint (whole connected components of the pair graph).")
    batch_size: int = Field(32, ge=2, description="Pairs per step per worker.")
    length_bucketing: bool = Field(True, description="Batch pairs of similar length (less padding).")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="Forward-pass precision; auto = bf16 where the hardware has it natively "
        "(CUDA, or CPUs with AMX), else fp32.")
    lr: float = Field(1e-4, gt=0, description="Encoder learning rate (peak, after warm-up).")
    head_lr: float = Field(1e-2, gt=0, description="Similarity-head learning rate.")
    weight_decay: float = Field(0.01, ge=0)
    warmup_ratio: float = Field(0.1, ge=0, le=1)
    max_grad_norm: float = Field(1.0, gt=0)
    init_scale: float = Field(0.05, gt=0, description=(
        "Initial λ of sigmoid(cos/λ − c); with init_bias, the boundary starts at cos = λ·c = 0.85, "
        "where a per-request false-hit budget of a few percent puts the threshold."))
    init_bias: float = Field(17.0, description="Initial c of sigmoid(cos/λ − c).")
    sld_eps: float = Field(0.01, gt=0, lt=0.5, description="SLD clips targets to [ε, 1−ε].")
    workers: int = Field(1, ge=1)
    gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs Ray reserves per training worker.")
    torch_threads: Optional[int] = Field(
        None, ge=1, description="Torch threads per worker; None = the node's cores shared by its "
        "workers (at least cpus_per_worker).")
    max_failures: int = Field(2, ge=0, description="Worker-group restarts from the last checkpoint.")
    resume: bool = Field(False, description="Continue a stopped run from its latest checkpoint.")
    max_pairs: Optional[int] = Field(
        None, ge=1, description="Use at most this many training pairs (a seeded uniform sample).")
    use_ray_data: bool = Field(
        False, description="Feed workers from Ray Data (for pair sets too big for memory); else the "
        "pairs travel in memory, which allows length bucketing and costs nothing per step.")
    seed: int = 0

    @model_validator(mode="after")
    def _trains_in_full_precision(self) -> "TrainConfig":
        if self.encoder.precision != "fp32":
            raise ValueError(f"encoder.precision {self.encoder.precision!r} is inference-only: "
                             f"fine-tuning needs fp32 weights (the forward pass's precision is `precision`)")
        return self


class EvaluateConfig(_Base):
    """ROC/PR evaluation of cosine similarity for one or more models."""

    pairs: str = Field(..., description="Labelled pair file.")
    out: str = Field(..., description="Output folder: metrics.json, roc.png, pr.png.")
    models: list[str] = Field(default_factory=list, description="Model folders; empty = default.")
    encoder: EncoderConfig = EncoderConfig()
    read: ReadConfig = ReadConfig()
    thresholds: list[float] = Field(default_factory=lambda: [0.7, 0.8, 0.9])


class CacheConfig(_Base):
    """The cache engine: index, capacity/eviction, TTL, decision policy, persistence."""

    index: Literal["flat", "hnsw", "ivf"] = Field("flat", description=(
        "Exact search, HNSW or IVF (large caches): one index per namespace (entries without history)."))
    hnsw_m: int = Field(32, ge=2, le=256, description="HNSW graph degree (memory and recall grow with it).")
    hnsw_ef_construction: int = Field(80, ge=1, le=4096, description="HNSW build breadth (build time vs graph quality).")
    hnsw_ef_search: int = Field(64, ge=1, le=4096, description="HNSW search breadth (lookup latency vs recall@1).")
    ivf_nlist: int = Field(1024, ge=1, le=1_000_000, description=(
        "IVF lists (k-means centroids); exact search until 39 x nlist entries, then trained once."))
    ivf_nprobe: int = Field(64, ge=1, le=1_000_000, description="IVF lists scanned per lookup (latency vs recall@1).")
    scope_index_min: int = Field(1024, ge=2, le=1_000_000, description=(
        "Entries at which a conversation (history) or long-prompt tail scope gets an index of its "
        "own; smaller ones are searched exactly among their own rows (no index per history)."))
    capacity: Optional[int] = Field(100_000, ge=1, description="Max entries (LRU eviction); None = unbounded.")
    ttl_s: Optional[float] = Field(None, gt=0, description="Default per-entry time to live, seconds.")
    policy: Literal["static", "calibrated"] = Field("static", description=(
        "static threshold, or calibrated on labelled pairs (bound among hits); see policy_file "
        "for a per-request bound."))
    threshold: float = Field(0.9, ge=-1, le=1, description="Cosine threshold (static policy).")
    target_false_hit: float = Field(0.02, gt=0, lt=1, description="δ for the calibrated policy.")
    confidence: float = Field(0.95, gt=0.5, lt=1, description="One-sided confidence of the bound.")
    calibration_pairs: Optional[str] = Field(None, description="Labelled pairs for calibration.")
    policy_file: Optional[str] = Field(None, description=(
        "Policy file from `raycache calibrate` (per-request false-hit bound); its threshold replaces "
        "`threshold` and `policy`. Refused when fitted for another model; nothing is refitted."))
    exact_tier: bool = Field(True, description="Answer exact repeats (whitespace-normalised) without encoding.")
    exact_casefold: bool = Field(False, description="Exact tier also folds case and Unicode (NFKC).")
    persist_path: Optional[str] = Field(None, description=(
        "Segment-log folder (local path or s3://...; an old snapshot file there is upgraded); None = "
        "in-memory only."))
    persist_interval_s: float = Field(30.0, gt=0)


CHAT_KEY_FIELDS = (
    "temperature", "top_p", "max_tokens", "max_completion_tokens", "stop", "seed", "n", "tools",
    "tool_choice", "functions", "function_call", "parallel_tool_calls", "response_format",
    "frequency_penalty", "presence_penalty", "logit_bias", "logprobs", "top_logprobs",
    "reasoning_effort", "verbosity", "modalities", "audio", "prediction", "web_search_options",
    # vLLM and other OpenAI-compatible servers
    "top_k", "min_p", "repetition_penalty", "length_penalty", "min_tokens", "stop_token_ids",
    "ignore_eos", "skip_special_tokens", "spaces_between_special_tokens", "include_stop_str_in_output",
    "best_of", "use_beam_search", "echo", "add_generation_prompt", "continue_final_message",
    "chat_template", "chat_template_kwargs", "documents", "truncate_prompt_tokens", "guided_json",
    "guided_regex", "guided_choice", "guided_grammar", "guided_decoding_backend",
    "guided_whitespace_pattern", "structured_outputs", "logits_processors",
)
"""Chat request fields that change the answer: each joins the chat cache key (model and every
message always do)."""
CHAT_UNKEYED_FIELDS = ("user", "metadata", "store", "service_tier", "safety_identifier",
                       "prompt_cache_key", "request_id", "priority")
"""Chat request fields known not to change the answer (``stream`` / ``stream_options`` never do)."""


class VerifyConfig(_Base):
    """Online verification: a share of hits (more near the threshold) is checked by the upstream and
    a judge; per-namespace thresholds follow the evidence (raycache.cache.online_policy)."""

    online: bool = Field(False, description="Verify hits online and adapt the threshold per namespace.")
    verify_near: float = Field(0.5, ge=0, le=1, description="Share of hits within near_margin above the threshold verified.")
    verify_far: float = Field(0.05, ge=0, le=1, description="Share of other (non-exact) hits verified.")
    near_margin: float = Field(0.03, ge=0, le=1, description="Width of the 'near the threshold' band.")
    explore: float = Field(0.3, ge=0, le=1, description=(
        "Share of near misses (within explore_margin below) judged against their nearest entry."))
    explore_margin: float = Field(0.03, ge=0, le=1, description="Width of the near-miss band.")
    window: int = Field(20_000, ge=100, description="Requests per namespace the bound is computed over.")
    min_verified: int = Field(30, ge=1, description="Verifications before the threshold may move.")
    floor: Optional[float] = Field(None, ge=-1, le=1, description=(
        "Lowest threshold it may come down to; None = the start threshold - 0.05."))
    judge: Literal["reference", "hf", "openai", "vllm"] = Field("reference", description=(
        "Teacher backend judging a verification (reference: fresh and cached responses match)."))
    judge_model: Optional[str] = Field(None, description="Judge model (hf, vllm) or name (openai).")
    judge_endpoint: Optional[str] = Field(None, description="OpenAI-compatible base URL of the judge.")
    judge_api_key_env: str = Field("OPENAI_API_KEY", description="Env var with the judge endpoint's key.")
    verified_pairs_out: Optional[str] = Field(None, description=(
        "Parquet folder (any pyarrow filesystem) the verified pairs are appended to (train --pairs reads it)."))
    flush_rows: int = Field(100, ge=1, description="Verified pairs per Parquet shard.")


class ServeConfig(_Base):
    """The Ray Serve embedding-plus-cache HTTP service."""

    encoder: EncoderConfig = EncoderConfig()
    cache: CacheConfig = CacheConfig()
    host: str = Field("127.0.0.1", description="Bind address (loopback unless told otherwise).")
    port: int = Field(8000, ge=0, le=65535)
    api_key_env: str = Field("RAYCACHE_API_KEY", description="Env var with the API key; unset = open.")
    upstream: Optional[str] = Field(None, description="OpenAI-compatible base URL for cache misses.")
    upstream_api_key_env: str = Field("UPSTREAM_API_KEY")
    upstream_timeout_s: float = Field(60.0, gt=0)
    max_request_bytes: int = Field(1_000_000, ge=1024)
    max_prompt_chars: int = Field(8000, ge=1)
    max_batch_prompts: int = Field(256, ge=1)
    api_keys_file: Optional[str] = Field(None, description=(
        "JSON file of tenant keys: {KEY: {\"namespaces\": [...]}} or {KEY: {\"admin\": true}}; "
        "$RAYCACHE_API_KEY (api_key_env) stays an admin key."))
    chat_key_fields: list[str] = Field(default_factory=lambda: list(CHAT_KEY_FIELDS), description=(
        "Chat request fields that join the cache key (model and messages always do)."))
    chat_unkeyed_fields: list[str] = Field(default_factory=lambda: list(CHAT_UNKEYED_FIELDS), description=(
        "Chat request fields that do not change the answer. A request with a field in neither "
        "list bypasses the cache."))
    chat_cache_tools: bool = Field(False, description="Cache chat requests that offer tools/functions.")
    chat_cache_n: bool = Field(False, description="Cache chat requests with n > 1 (all n choices).")
    embedder: Literal["deployment", "engine", "ingress"] = Field("deployment", description=(
        "Where prompts are embedded: 'deployment' = the Embedder deployment (stateless, autoscaled, "
        "the choice for GPUs), 'engine' = an encoder inside each CacheEngine replica (CPU: one "
        "hop fewer per request; each engine replica gets embedder_num_cpus more CPUs and "
        "embedder_num_cpus x embedder_max_replicas torch threads, at least 1), 'ingress' = one "
        "process: the single Ingress replica holds the cache engine and its encoder (shards 1 only; "
        "two hops fewer per request; it gets the engine's CPUs)."))
    embedder_min_replicas: int = Field(1, ge=0)
    embedder_max_replicas: int = Field(2, ge=1)
    embedder_num_cpus: float = Field(0.5, gt=0)
    embedder_num_gpus: float = Field(0.0, ge=0)
    serve_batch_size: int = Field(64, ge=1)
    serve_batch_wait_s: float = Field(0.005, ge=0)
    shards: int = Field(1, ge=1, le=64, description=(
        "Cache engine replicas; a namespace lives on one (hash routing). Capacity is per shard; each "
        "shard persists to <persist_path>.shard-<i>-of-<N>."))
    blocking: bool = Field(True, description="Keep the process alive serving until Ctrl-C.")
    write_serve_config: Optional[str] = Field(
        None, description="Write a `serve deploy` YAML for this config to this path and exit.")
    verify: VerifyConfig = VerifyConfig()

    @model_validator(mode="after")
    def _one_shard_in_the_ingress(self) -> "ServeConfig":
        if self.embedder == "ingress" and self.shards != 1:
            raise ValueError(f"embedder 'ingress' holds one cache in the Ingress replica: it needs "
                             f"shards 1, not {self.shards} (use embedder 'engine' with shards)")
        return self


class SimulateConfig(_Base):
    """Replay a prompt stream through the cache, offline or against a live endpoint."""

    stream: str = Field(..., description="Stream file or folder of shards (arrival order).")
    out: str = Field(..., description="Output folder: simulation.json, hit_vs_false_hit.png.")
    models: list[str] = Field(default_factory=list, description="Model folders; empty = default.")
    encoder: EncoderConfig = EncoderConfig()
    cache: CacheConfig = CacheConfig(capacity=None)
    read: ReadConfig = ReadConfig()
    threshold: Optional[float] = Field(None, description="One threshold; None = sweep.")
    delta: float = Field(0.02, gt=0, lt=1, description="Headline: hit rate at false-hit rate ≤ δ.")
    endpoint: Optional[str] = Field(None, description="Live mode: base URL of a running service.")
    api_key_env: str = Field("RAYCACHE_API_KEY")
    concurrency: int = Field(2, ge=1, description="Live mode: HTTP client actors.")
    rate: Optional[float] = Field(None, gt=0, description=(
        "Live mode: max arrivals/s overall. Offline: the simulated arrival rate TTLs expire on "
        "(default 1/s) when the stream has no 'timestamp' column."))
    duration: Optional[float] = Field(None, gt=0, description="Live mode: stop after this many seconds.")
    lookup_batch: int = Field(32, ge=1, description="Live mode: prompts per batched lookup.")
    embeddings: Optional[str] = Field(None, description="Precomputed embeddings (.npy) for the stream.")
    thresholds: list[float] = Field(default_factory=list,
                                    description="Sweep grid; empty = 0.30…0.99 step 0.01, plus 0.995.")
    replay: Literal["auto", "vectorized", "engine"] = Field(
        "auto", description="Offline replay: vectorized where exact, else the engine one by one.")
    chunk_size: int = Field(2048, ge=16, description="Offline: arrivals per vectorized chunk.")
    timeout_s: float = Field(30.0, gt=0, description="Live mode: HTTP timeout per request.")
    max_retries: int = Field(6, ge=0, description="Live mode: retries (with backoff) on errors/5xx.")
    policy: Optional[str] = Field(None, description=(
        "Offline: also replay under this policy file from `raycache calibrate` (one model; refused "
        "when fitted for another model) and report its realised per-request false-hit rate."))
    operating_point: bool = Field(True, description=(
        "Offline: report correct-hit rate at per-arrival false-hit <= δ for each operating delta, the "
        "threshold chosen on a calibration stream disjoint by group (calibration_stream, else half "
        "of this stream's groups; the other half is the test stream)."))
    operating_deltas: list[float] = Field(default_factory=lambda: [0.01, 0.02, 0.05],
                                          description="False-hit budgets of the operating point.")
    calibration_stream: Optional[str] = Field(None, description=(
        "Offline operating point: calibration stream (disjoint by group from `stream`, the test)."))
    calibration_embeddings: Optional[str] = Field(None, description=(
        "Precomputed embeddings (.npy) of calibration_stream (with `embeddings`)."))
    confidence: float = Field(0.95, gt=0.5, lt=1, description="Operating point: confidence of the bound.")
    seed: int = Field(0, description="Operating point: seed of the split by group.")
    online_start: Optional[float] = Field(None, ge=-1, le=1, description=(
        "Offline: also replay with online verification (the stream's labels as the judge) starting "
        "from this threshold; reports realised false-hit, hit rate, threshold over time, cost."))


class CalibrateConfig(_Base):
    """Choose the cache threshold for a per-request false-hit budget on a replayed labelled stream."""

    stream: str = Field(..., description="Labelled calibration stream (prompt + group or answers), arrival order.")
    out: str = Field("policy.json", description="Policy file to write (JSON).")
    encoder: EncoderConfig = EncoderConfig()
    cache: CacheConfig = CacheConfig(capacity=None)
    read: ReadConfig = ReadConfig()
    target_false_hit: float = Field(0.02, gt=0, lt=1, description="δ: the false-hit budget.")
    confidence: float = Field(0.95, gt=0.5, lt=1, description="One-sided confidence of the bound.")
    bound: Literal["per_request", "among_hits"] = Field("per_request", description=(
        "per_request: wrong cached answers / all requests; among_hits: wrong / cached answers."))
    thresholds: list[float] = Field(default_factory=list,
                                    description="Candidate thresholds; empty = 0.300…0.995 step 0.005.")
    embeddings: Optional[str] = Field(None, description="Precomputed embeddings (.npy) for the stream.")
    replay: Literal["auto", "vectorized", "engine"] = Field(
        "auto", description="Replay: vectorized where exact, else the engine one by one.")
    clusters: Literal["confusion", "group", "none"] = Field("confusion", description=(
        "Correlated arrivals widen the bound by their design effect: confusion = groups joined by "
        "their false hits; group = each arrival's group; none = independent arrivals (binomial)."))
    horizon: Optional[int] = Field(0, ge=0, description=(
        "Bound the realised false-hit rate over the next N requests (a finite window: a day's "
        "traffic, a test stream): 0 = as many as the calibration stream has arrivals; none = bound "
        "the traffic's long-run rate instead (looser: a window's realised rate may exceed δ). "
        "per_request only (ignored for among_hits)."))


class PipelineConfig(_Base):
    """The main job: generate → mine → label → train (BCE, SLD) → evaluate → serve + live replay."""

    out: str = Field("runs/pipeline", description="Report folder.")
    quick: bool = Field(False, description="A smaller, faster run.")
    from_stage: Optional[str] = Field(
        None, description="Rerun from this stage (generate, mine, label, train, evaluate, simulate, live).")
    to_stage: Optional[str] = Field(None, description="Stop after this stage (default: run to the end).")
    verbose: bool = Field(False, description=(
        "Show Ray Data's status blocks, transformers' loading output and Ray's INFO logs."))
    generate: GenerateConfig = GenerateConfig()
    encoder: EncoderConfig = EncoderConfig()
    cache: CacheConfig = CacheConfig()
    losses: list[Literal["bce", "sld"]] = Field(
        default_factory=lambda: ["bce", "sld"],
        description="Fine-tune once per loss; the model with the best validation AUC (or the base model) is served.")
    epochs: int = Field(1, ge=1)
    max_train_pairs: int = Field(1500, ge=10, description="Cap on mined pairs used for fine-tuning (per loss).")
    workers: int = Field(1, ge=1)
    delta: float = Field(0.02, gt=0, lt=1, description="Headline: correct-hit rate at false-hit rate ≤ δ.")
    k: int = Field(4, ge=1, description="Mining: nearest neighbours per prompt.")
    random_per_prompt: float = Field(0.5, ge=0, description="Mining: random pairs per prompt (expected).")
    live_arrivals: int = Field(1000, ge=1, description="Live replay: arrivals from the head of the test stream.")
    teacher: Literal["reference", "hf", "openai", "vllm"] = Field(
        "reference", description="Who labels the mined pairs (see raycache label).")
    teacher_model: Optional[str] = Field(None, description="Teacher model folder/hub id (hf, vllm) or name (openai).")
    endpoint: Optional[str] = Field(None, description="Teacher: OpenAI-compatible base URL (openai).")
    api_key_env: str = Field("OPENAI_API_KEY", description="Teacher: env var holding the endpoint's API key.")
    concurrency: Optional[int] = Field(
        None, ge=1, description="Teacher: actors (hf/vllm) or requests in flight (openai); None = label's default.")


def _deep_update(base: dict, new: dict) -> dict:
    out = dict(base)
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_update(out[key], value)
        else:
            out[key] = value
    return out


def load_yaml(path: str | Path | None) -> dict[str, Any]:
    """Read a YAML config file into a dict (empty dict for None)."""
    if path is None:
        return {}
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at top level")
    return data


def build_config(model: type[_Base], *layers: dict[str, Any]) -> Any:
    """Merge dict layers (later wins, nested dicts merged) and validate into ``model``.

    Raises ConfigError naming every invalid field.
    """
    merged: dict[str, Any] = {}
    for layer in layers:
        merged = _deep_update(merged, layer or {})
    try:
        return model.model_validate(merged)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or model.__name__}: {err['msg']}"
            for err in exc.errors()
        )
        raise ConfigError(f"invalid {model.__name__}: {problems}") from None


def _yaml_lines(model: type[_Base], indent: int = 0) -> list[str]:
    pad = "  " * indent
    lines = []
    for name, field in model.model_fields.items():
        tp = field.annotation
        inner = [a for a in getattr(tp, "__args__", ()) if isinstance(a, type) and issubclass(a, BaseModel)]
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            inner = [tp]
        note = f"  # {field.description}" if field.description else ""
        if inner:
            lines.append(f"{pad}{name}:{note}")
            lines += _yaml_lines(inner[0], indent + 1)
            continue
        if field.is_required():
            lines.append(f"{pad}{name}: null  # required.{note[3:] and ' ' + note[4:]}")
            continue
        default = field.get_default(call_default_factory=True)
        dumped = yaml.safe_dump(default, default_flow_style=True).strip()
        if dumped.endswith("\n..."):
            dumped = dumped[:-4].strip()
        dumped = dumped.removesuffix("...").strip()
        lines.append(f"{pad}{name}: {dumped}{note}")
    return lines


SECTIONS: dict[str, type[_Base]] = {
    "encoder": EncoderConfig, "cache": CacheConfig, "read": ReadConfig,
    "generate": GenerateConfig, "mine": MineConfig, "label": LabelConfig, "train": TrainConfig,
    "evaluate": EvaluateConfig, "serve": ServeConfig, "simulate": SimulateConfig,
    "calibrate": CalibrateConfig, "pipeline": PipelineConfig,
}


def default_config_yaml() -> str:
    """The documented default config: shared sections (encoder, cache, read) then one per stage.

    A stage's own ``encoder`` / ``cache`` / ``read`` keys override the shared sections.
    """
    out = ["# raycache configuration: every field with its default. Generated by",
           "# `python -c 'from raycache.config import default_config_yaml; print(default_config_yaml())'`.",
           "# Shared sections (encoder, cache, read) apply to every stage that has them; CLI flags override all."]
    for section, model in SECTIONS.items():
        out.append("")
        out.append(f"{section}:  # {(model.__doc__ or '').strip().splitlines()[0]}")
        skip = {"encoder", "cache", "read"} if section not in ("encoder", "cache", "read") else set()
        lines = _yaml_lines(model, 1)
        # nested shared sections are documented once, at top level
        kept, drop = [], False
        for line in lines:
            key = line.strip().split(":", 1)[0]
            if line.startswith("  ") and not line.startswith("    "):
                drop = key in skip
            if not drop:
                kept.append(line)
        out += kept
    return "\n".join(out) + "\n"
