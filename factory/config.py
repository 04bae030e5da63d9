"""Typed config schemas (Hydra structured configs) and helpers shared by every entry point.

The YAML files under ``conf/`` extend these schemas, so a misspelt key (``sampler.temprature=0.7``) fails
at compose time with the key's name instead of being silently ignored.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


@dataclass
class PathsConfig:
    run_dir: str = MISSING  # every stage reads and writes only under here (stable across resumes)
    cache_dir: str = ".cache/restem"  # base models trained locally, keyed by their settings
    data_dir: str = "../shared/datasets"  # benchmark JSONL files (not needed by the arith default)


@dataclass
class ArithTaskConfig:
    name: str = "arith"
    seed: int = 0
    num_human: int = 250  # human-written seed solutions (base pretraining and the SFT baseline)
    num_train: int = 2000  # problems the E-step samples on (answers only are used)
    num_validation: int = 500  # for tuning; never tune on test
    num_test: int = 500
    min_steps: int = 1
    max_steps: int = 4
    human_min_steps: int = 1
    human_max_steps: int = 4
    max_operand: int = 5
    max_value: int = 30
    strictness: str = "steps"  # E-step reward: "answer" (outcome only, the paper) or "steps"
    prompt_style: str = "plain"  # plain ("Q: ...\nA: ", tiny model) | chat (the tokenizer's chat template)


@dataclass
class MathTaskConfig:
    """GSM8K, Hendrycks MATH and MATH-500 (factory/tasks/math_tasks.py); the YAMLs set per-task values."""

    name: str = MISSING  # gsm8k | math | math500
    source: str = "local"  # "local": JSONL files under paths.data_dir; "hub": datasets.load_dataset
    hub_name: str | None = None  # e.g. openai/gsm8k, HuggingFaceH4/MATH-500
    hub_config: Any = None  # e.g. "main", or a list of configs that are concatenated in order
    hub_pool_name: str | None = None  # math500 only: MATH train+test on the Hub (its training pool)
    hub_pool_config: Any = None
    seed: int = 0
    shuffle: bool = False  # seeded shuffle of the training pool (default: file order)
    num_human: int = 500  # head of the training pool, with human solutions (base pretraining, SFT baseline)
    num_train: int | None = None  # problems the E-step samples on (answers only); null = up to validation
    train_start: int | None = None  # first train problem in the pool; null = right after the human ones
    num_validation: int = 500  # tail of the training pool; for tuning, never tune on test
    num_test: int | None = None  # null = the whole benchmark test set
    max_chars: int | None = None  # drop pool problems whose question + solution is longer (tiny models)
    prompt_style: str = "plain"  # plain | fewshot (num_shots human solutions) | chat (tokenizer template)
    num_shots: int = 4
    strictness: str = "answer"  # outcome-only reward (the paper); these tasks have no step checks
    verifier_timeout: float = 5.0  # seconds per sample (math-verify in a deadline pool)
    verifier_workers: int = 2


@dataclass
class CodeTaskConfig:
    """HumanEval, MBPP and APPS (factory/tasks/code_tasks.py), judged in the code sandbox."""

    name: str = MISSING  # humaneval | mbpp | apps
    variant: str = "full"  # MBPP (also humaneval's training pool): "full" (974) or "sanitized" (427)
    train_file: str | None = None  # apps only: JSONL under paths.data_dir with solutions (the pool)
    test_file: str | None = None  # apps only: JSONL under paths.data_dir (the test set)
    seed: int = 0
    shuffle: bool = False
    num_human: int = 100
    num_train: int | None = None
    train_start: int | None = None
    num_validation: int = 90
    num_test: int | None = None
    max_chars: int | None = None
    prompt_style: str = "plain"  # plain (continue the prompt) | chat (tokenizer template, fenced code)
    strictness: str = "answer"  # every unit test must pass
    verifier_timeout: float = 5.0  # wall-clock seconds per sandbox job
    verifier_workers: int = 2  # sandbox jobs at once
    memory_mb: int = 1024  # address-space limit per job


@dataclass
class ReasoningGymTaskConfig:
    """reasoning-gym's procedural datasets (factory/tasks/reasoning_gym_task.py), judged by score_answer."""

    name: str = "reasoning_gym"
    dataset: str = MISSING  # a reasoning-gym dataset name, e.g. chain_sum, leg_counting, spell_backward
    dataset_config: Any = (
        None  # create_dataset(name, **this): a mapping such as {max_terms: 3}; null: defaults
    )
    seed: int = 0  # each split's generator seed is derived from it and the split's name
    num_human: int = 200  # problems with a reference answer line (base pretraining, SFT baseline)
    num_train: int = 2000  # problems the E-step samples on (answers only are used)
    num_validation: int = 200
    num_test: int = 200
    threshold: float = 1.0  # reward 1 when score_answer(answer, entry) >= threshold
    prompt_style: str = "plain"  # plain ("Q: ...\nA: ", tiny model) | chat (the tokenizer's chat template)
    strictness: str = "answer"  # outcome-only reward: score_answer judges the final answer
    verifier_timeout: float = 5.0  # seconds per score_answer call (in a deadline pool)
    verifier_workers: int = 2


@dataclass
class TinyModelConfig:
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4  # head_dim = hidden_size / num_heads must be >= 32 for vLLM's CPU kernels
    intermediate_size: int = 512
    max_position_embeddings: int = 512


@dataclass
class SelectConfig:
    """Selection on validation accuracy (train/selection.py): ``model.pretrain.select`` for the tiny base
    model, ``trainer.select`` for the M-steps and the SFT baseline; ``every: 0`` turns it off."""

    every: int = 0  # optimizer steps between greedy scorings of the validation problems
    patience: int = 3  # stop after this many scorings without a new best
    num_problems: int = 200  # first N problems of the task's validation split
    min_steps: int = 0  # no scoring (so no pick, no stop) before this step: early noisy peaks don't count


@dataclass
class PretrainConfig:
    max_steps: int = 2400  # the most steps; with select.every > 0 the fit stops at the validation plateau
    batch_size: int = 4
    lr: float = 1.5e-3
    warmup_steps: int = 100
    select: SelectConfig = field(default_factory=SelectConfig)


@dataclass
class ModelConfig:
    name: str = MISSING
    name_or_path: str | None = None  # Hub name or local folder; null builds the tiny model locally
    dtype: str = "float32"
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)


@dataclass
class SamplerConfig:
    """The E-step sampler (``conf/sampler/hf.yaml``); every backend shares these keys."""

    backend: str = "hf"
    num_samples: int = 8  # K samples per training problem
    temperature: float = 0.8
    top_k: int = 40  # 0 disables
    top_p: float = 1.0
    max_new_tokens: int = 512  # each task's generation config (conf/generation/) sets its own
    batch_size: int = (
        16  # prompts per generate call (x num_samples sequences; small batches are faster on CPU)
    )
    shard_size: int = 500  # problems per parquet shard (the unit of resume)
    seed: int = 0  # sample j of a problem is seeded with derive_seed(seed, problem_id) + j
    stop: list[str] = field(default_factory=list)  # strings that end a completion (cut before them)
    cache: bool = True  # reuse samples of the same policy/problems/settings (factory/sample_cache.py)
    # HF backend only (vLLM ignores it): sampling processes on this machine (factory/sampling/workers.py).
    # Any count draws the same samples; on a CPU, one process per core beats one process with 2 threads.
    workers: int = 1
    # Torch threads per HF worker process (null: the cores divided by workers), or of vLLM's CPU engine
    # (null: every core; vLLM alone would use 1). GPU vLLM engines ignore it.
    threads: int | None = None


@dataclass
class VllmSamplerConfig(SamplerConfig):
    """vLLM engine settings on top of the shared keys (``conf/sampler/vllm.yaml``, factory/sampling)."""

    backend: str = "vllm"
    dtype: str = "auto"  # the weights' dtype in vLLM; the YAML ties it to model.dtype
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    max_model_len: int | None = None  # null: the model's own limit
    max_num_seqs: int | None = None  # sequences per engine step; null: vLLM's default
    enable_prefix_caching: bool = True  # a prompt's K samples share its prefilled KV cache
    enforce_eager: bool | None = None  # null: true on CPU (vLLM's CPU build), false (CUDA graphs) on GPUs
    cpu_kvcache_space: int = 1  # GiB of KV cache on vLLM's CPU build (VLLM_CPU_KVCACHE_SPACE)


@dataclass
class LoraSettings:
    """LoRA M-steps (peft): adapters on the base model's linear layers, merged into the weights on export."""

    r: int = 0  # adapter rank; 0 = full fine-tuning
    alpha: int = 32  # adapter scale = alpha / r
    dropout: float = 0.0  # 0 keeps a resumed M-step identical to an uninterrupted one (no RNG in checkpoints)
    target_modules: Any = (
        "all-linear"  # peft's names: "all-linear" (every linear but the output head) or a list
    )


@dataclass
class TrainerConfig:
    accelerator: str = "cpu"
    devices: Any = 1
    strategy: str = "auto"
    num_nodes: int = 1
    # Autocast only ("32-true", "bf16-mixed", "16-mixed"): the optimizer always steps fp32 master weights.
    precision: str = "32-true"
    max_steps: int = (
        600  # optimizer steps per M-step (and for the SFT baseline: same budget); with epochs: a cap
    )
    epochs: float | None = (
        None  # null: max_steps steps; else ceil(epochs x examples / global batch), <= max_steps
    )
    max_seq_len: int = (
        2048  # tokens per example (also <= the model's max_position_embeddings); prompts cut left
    )
    batch_size: int = 4  # micro-batch per device
    global_batch_size: int | None = None  # per optimizer step (accumulates); null = batch_size x devices
    packing: bool = False  # one unpadded row per micro-batch, no attention across samples
    loss_chunk_size: int = 0  # >0: chunked cross-entropy, no full fp32 logits (large vocabularies)
    compile: bool = False  # torch.compile the model
    gradient_checkpointing: bool = False
    checkpoint_every_n_steps: int = 200  # resumable checkpoints in the stage's .partial dir; 0 = none
    lr: float = 1e-5  # fine-tuning a pretrained model; the tiny demo's recipe sets 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1  # linear decay to lr * min_lr_ratio
    grad_clip: float = 1.0
    seed: int = 0
    progress_bar: bool = True
    lora: LoraSettings = field(default_factory=LoraSettings)
    # Greedy validation accuracy every select.every steps; the best weights are exported, the fit stops at
    # a plateau (one process only). Same rule for the M-steps and the SFT baseline.
    select: SelectConfig = field(default_factory=SelectConfig)


@dataclass
class SnapshotConfig:
    max_per_problem: int = 10  # the paper's cap, so easy problems do not dominate
    dedupe: bool = True
    # Drop kept rows whose problem statement or completion shares a word n-gram with the run's evaluation sets
    # (factory/decontaminate.py); before the cap.
    decontaminate: bool = True
    ngram: int = 13  # GPT-3's n
    # gold: keep samples the verifier judges correct; majority: keep samples that agree with the answer
    # most of a problem's samples agree on (factory/pseudo_labels.py), the gold used only to measure
    label: str = "gold"
    min_votes: int = 2  # majority: the label's samples at least (>= 2: samples that all disagree never label)
    min_share: float = 0.5  # majority: and at least this share of the problem's samples


@dataclass
class CurriculumConfig:
    """Which training problems each E-step samples, from the latest pass rates (factory/curriculum.py).
    Both null (the default): every problem, sampler.num_samples samples each, as in the paper."""

    skip_solved_at: float | None = None  # skip problems solved at least this share of the time
    rare_below: float | None = None  # problems solved less than this share of the time get rare_samples
    rare_samples: int | None = None  # samples for those (> sampler.num_samples)


@dataclass
class EvalConfig:
    split: str = "test"
    num_samples: int = 8  # samples per problem for pass@k and maj@k
    ks: list[int] = field(default_factory=lambda: [1, 4, 8])
    temperature: float = 1.0  # the paper's pass@k setting
    top_p: float = 0.95
    max_new_tokens: int = 512  # each task's generation config (conf/generation/) sets its own
    batch_size: int = 16  # prompts per sampled call; greedy calls take batch_size * num_samples prompts
    limit: int | None = None  # evaluate only the first N problems of the split


@dataclass
class LoopConfig:
    iterations: int = 3
    include_human_data: bool = False  # add the human seeds to each M-step (ReST, not ReST-EM)
    sft_baseline: bool = True
    stop_on_empty_snapshot: bool = True


@dataclass
class LoggerConfig:
    """Experiment tracking (``logger=tensorboard``; factory/tracking.py): M-step curves and per-iteration
    yield and eval metrics under one folder of the run. It never changes what is trained or sampled."""

    kind: str = "none"  # none | tensorboard
    save_dir: str = "${paths.run_dir}/tracking"  # tensorboard --logdir <this>
    every_n_steps: int = 10  # M-step loss, learning rate and tokens/s every n optimizer steps


@dataclass
class ClusterConfig:
    """Where generation runs (``cluster=ray``; factory/sampling/ray_pool.py): ``local`` samples and
    evaluates in this process (and its sampler.workers); ``ray`` runs the E-step's shards and the
    evaluation's batches on an actor pool of ``replicas`` engine replicas. Samples are the same either way."""

    kind: str = "local"  # local | ray
    # A Ray cluster to join ("auto": this machine's `ray start` cluster); null: $RAY_ADDRESS, else a new
    # local Ray instance.
    address: str | None = None
    replicas: int = 2  # engine replicas (Ray actors), each with the whole model
    num_cpus: float = 1.0  # Ray logical CPUs each replica asks for (a scheduling share, may be < 1)
    # GPUs per replica; null: sampler.tensor_parallel_size (vLLM) or 1 (HF) where the cluster has GPUs
    # when the stage starts, else 0 (set it on an autoscaling cluster whose GPU nodes may be down).
    num_gpus: float | None = None
    # Torch threads per CPU replica; null: num_cpus (>= 1), or sampler.threads where that is fewer.
    threads: int | None = None
    local_cpus: int | None = None  # logical CPUs of a new local Ray instance; null: this process's cores
    start_timeout_s: int = 1800  # every replica must have started (model loaded) within it, else an error


@dataclass
class RestemConfig:
    name: str = MISSING
    seed: int = 0
    iteration: int = 1  # used by the single-stage commands (restem-sample iteration=2, ...)
    paths: PathsConfig = field(default_factory=PathsConfig)
    task: Any = MISSING
    model: ModelConfig = field(default_factory=ModelConfig)
    sampler: Any = MISSING  # SamplerConfig or VllmSamplerConfig, picked by conf/sampler/*.yaml
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    snapshot: SnapshotConfig = field(default_factory=SnapshotConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)


def register_configs() -> None:
    """Registers the schemas in Hydra's ConfigStore (idempotent)."""
    cs = ConfigStore.instance()
    cs.store(name="restem_schema", node=RestemConfig)
    cs.store(group="task", name="arith_schema", node=ArithTaskConfig)
    cs.store(group="task", name="math_task_schema", node=MathTaskConfig)
    cs.store(group="task", name="code_task_schema", node=CodeTaskConfig)
    cs.store(group="task", name="reasoning_gym_schema", node=ReasoningGymTaskConfig)
    cs.store(group="sampler", name="hf_schema", node=SamplerConfig)
    cs.store(group="sampler", name="vllm_schema", node=VllmSamplerConfig)


def compose(overrides: list[str] | None = None) -> DictConfig:
    """Composes ``conf/config.yaml`` outside of ``@hydra.main`` (tests, notebooks)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=list(overrides or []))
    validate(cfg)
    return cfg


_CHOICES = {
    "sampler.backend": ("hf", "vllm"),
    "task.strictness": ("answer", "steps"),
    "task.source": ("local", "hub"),
    "task.prompt_style": ("plain", "fewshot", "chat"),
    "eval.split": ("validation", "test"),
    "model.dtype": ("float32", "bfloat16", "float16"),
    "logger.kind": ("none", "tensorboard"),
    "cluster.kind": ("local", "ray"),
    "snapshot.label": ("gold", "majority"),
}


def validate(cfg: DictConfig) -> None:
    """Checks values the schema's types cannot express; raises ValueError naming the key."""
    for key, allowed in _CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value is not None and value not in allowed:
            raise ValueError(f"config error: {key}={value!r}; allowed: {', '.join(allowed)}")
    if cfg.task.name in ("gsm8k", "math", "math500", "humaneval", "mbpp", "apps"):
        if cfg.task.strictness != "answer":
            raise ValueError(
                f"config error: task.strictness={cfg.task.strictness!r}; allowed for {cfg.task.name}: answer"
            )
        if cfg.task.verifier_workers < 1 or not cfg.task.verifier_timeout > 0:
            raise ValueError(
                "config error: task.verifier_workers must be >= 1 and task.verifier_timeout > 0, got "
                f"{cfg.task.verifier_workers} and {cfg.task.verifier_timeout}"
            )
    if cfg.task.name == "reasoning_gym":
        _validate_reasoning_gym(cfg.task)
    if cfg.task.name == "arith" and cfg.task.prompt_style not in ("plain", "chat"):
        raise ValueError(
            f"config error: task.prompt_style={cfg.task.prompt_style!r}; allowed for arith: plain, chat"
        )
    positive = [
        "sampler.num_samples",
        "sampler.batch_size",
        "sampler.shard_size",
        "sampler.max_new_tokens",
        "sampler.workers",
        "trainer.max_steps",
        "trainer.batch_size",
        "trainer.max_seq_len",
        "eval.num_samples",
        "eval.batch_size",
        "snapshot.max_per_problem",
        "snapshot.ngram",
        "logger.every_n_steps",
    ]
    for key in positive:
        if OmegaConf.select(cfg, key) < 1:
            raise ValueError(f"config error: {key} must be >= 1, got {OmegaConf.select(cfg, key)}")
    for key in ("trainer.loss_chunk_size", "trainer.checkpoint_every_n_steps"):
        if OmegaConf.select(cfg, key) < 0:
            raise ValueError(f"config error: {key} must be >= 0, got {OmegaConf.select(cfg, key)}")
    if cfg.sampler.threads is not None and cfg.sampler.threads < 1:
        raise ValueError(f"config error: sampler.threads must be >= 1 or null, got {cfg.sampler.threads}")
    check_trainer(cfg.trainer)
    pretrain_select = cfg.model.pretrain.select
    if pretrain_select.every < 0:
        raise ValueError(
            f"config error: model.pretrain.select.every must be >= 0 (0 = off), got {pretrain_select.every}"
        )
    for key in ("model.pretrain.select.min_steps", "trainer.select.min_steps"):
        if OmegaConf.select(cfg, key) < 0:
            raise ValueError(f"config error: {key} must be >= 0, got {OmegaConf.select(cfg, key)}")
    for key in ("patience", "num_problems"):
        if pretrain_select.every > 0 and pretrain_select[key] < 1:
            raise ValueError(
                f"config error: model.pretrain.select.{key} must be >= 1, got {pretrain_select[key]}"
            )
    if cfg.loop.iterations < 0:
        raise ValueError(f"config error: loop.iterations must be >= 0, got {cfg.loop.iterations}")
    if not cfg.sampler.temperature >= 0.0:
        raise ValueError(f"config error: sampler.temperature must be >= 0, got {cfg.sampler.temperature}")
    for key in ("sampler.top_p", "eval.top_p"):
        if not 0.0 < OmegaConf.select(cfg, key) <= 1.0:
            raise ValueError(f"config error: {key} must be in (0, 1], got {OmegaConf.select(cfg, key)}")
    bad_ks = [k for k in cfg.eval.ks if k < 1]
    if bad_ks:
        raise ValueError(f"config error: eval.ks must be >= 1, got {list(cfg.eval.ks)}")
    _validate_model_choice(cfg)
    _validate_cluster(cfg.cluster)
    from factory.curriculum import validate_curriculum

    validate_curriculum(cfg)
    _validate_labels(cfg)
    if cfg.logger.kind == "tensorboard":
        from factory.tracking import INSTALL, tensorboard_installed

        if not tensorboard_installed():
            raise ValueError(INSTALL)
    if cfg.model.name_or_path is None:
        tiny = cfg.model.tiny
        if tiny.hidden_size % tiny.num_heads or tiny.hidden_size // tiny.num_heads < 32:
            raise ValueError(
                "config error: model.tiny.hidden_size / model.tiny.num_heads must be an integer >= 32 "
                f"(vLLM's CPU attention kernels), got {tiny.hidden_size}/{tiny.num_heads}"
            )


def _validate_reasoning_gym(task: DictConfig) -> None:
    """``task=reasoning_gym``: the package, the dataset name and its config, the sizes and the threshold."""
    import importlib.util

    if importlib.util.find_spec("reasoning_gym") is None:
        raise ValueError(
            "config error: task=reasoning_gym needs reasoning-gym: pip install -e '.[reasoning-gym]'"
        )
    from reasoning_gym.factory import DATASETS

    if task.dataset not in DATASETS:
        import difflib

        close = difflib.get_close_matches(str(task.dataset), DATASETS, n=3, cutoff=0.5)
        examples = close or ["chain_sum", "basic_arithmetic", "leg_counting", "spell_backward", "gcd"]
        raise ValueError(
            f"config error: task.dataset={task.dataset!r} is not a reasoning-gym dataset; e.g. "
            f"{', '.join(examples)} ({len(DATASETS)} in all: reasoning_gym.factory.DATASETS)"
        )
    raw = task.dataset_config
    if raw is not None and not isinstance(raw, DictConfig):
        shown = OmegaConf.to_container(raw) if OmegaConf.is_config(raw) else raw
        raise ValueError(
            f"config error: task.dataset_config must be a mapping such as {{max_terms: 3}} or null, got {shown!r}"
        )
    config = {} if task.dataset_config is None else OmegaConf.to_container(task.dataset_config, resolve=True)
    reserved = sorted({"seed", "size"} & set(config))
    if reserved:
        raise ValueError(
            f"config error: task.dataset_config.{reserved[0]} is set by the task (task.seed and "
            "task.num_human/num_train/num_validation/num_test); remove it"
        )
    try:
        settings = DATASETS[task.dataset][1](**config)
        if hasattr(settings, "validate"):
            settings.validate()
    except (TypeError, ValueError, AssertionError) as err:
        raise ValueError(f"config error: task.dataset_config for {task.dataset!r}: {err}") from None
    for key in ("num_human", "num_validation", "num_test"):
        if task[key] < 0:
            raise ValueError(f"config error: task.{key} must be >= 0, got {task[key]}")
    if task.num_train < 1:
        raise ValueError(f"config error: task.num_train must be >= 1, got {task.num_train}")
    if not 0.0 < task.threshold <= 1.0:
        raise ValueError(f"config error: task.threshold must be in (0, 1], got {task.threshold}")
    if task.prompt_style not in ("plain", "chat"):
        raise ValueError(
            f"config error: task.prompt_style={task.prompt_style!r}; allowed for reasoning_gym: plain, chat"
        )
    if task.strictness != "answer":
        raise ValueError(
            f"config error: task.strictness={task.strictness!r}; allowed for reasoning_gym: answer"
        )
    if task.verifier_workers < 1 or not task.verifier_timeout > 0:
        raise ValueError(
            "config error: task.verifier_workers must be >= 1 and task.verifier_timeout > 0, got "
            f"{task.verifier_workers} and {task.verifier_timeout}"
        )


def _validate_labels(cfg: DictConfig) -> None:
    """``snapshot.label`` and the majority-vote thresholds (factory/pseudo_labels.py)."""
    snapshot = cfg.snapshot
    if snapshot.min_votes < 2:
        raise ValueError(
            f"config error: snapshot.min_votes must be >= 2 (one vote would label a problem whose samples "
            f"all disagree), got {snapshot.min_votes}"
        )
    if not 0.0 < snapshot.min_share <= 1.0:
        raise ValueError(f"config error: snapshot.min_share must be in (0, 1], got {snapshot.min_share}")
    if snapshot.label == "majority" and cfg.task.name in ("humaneval", "mbpp", "apps"):
        raise ValueError(
            f"config error: snapshot.label=majority needs final answers to vote on; task {cfg.task.name} "
            "is judged by unit tests (use snapshot.label=gold)"
        )
    if snapshot.label == "majority":
        from factory.tasks import TASKS

        task_class = TASKS.get(cfg.task.name)
        if task_class is not None and not hasattr(task_class, "group_answers"):
            raise ValueError(
                f"config error: snapshot.label=majority needs a task that groups answers; task "
                f"{cfg.task.name} has no group_answers (use snapshot.label=gold)"
            )


RAY_INSTALL = "config error: cluster=ray needs Ray: pip install -e '.[ray]' (ray[data])"


def ray_installed() -> bool:
    """Whether Ray can be imported here (``cluster=ray``; factory/sampling/ray_pool.py)."""
    import importlib.util

    return importlib.util.find_spec("ray") is not None


def _validate_cluster(cluster: DictConfig) -> None:
    """``cluster.*`` values, and Ray installed when ``cluster=ray`` (one config error, not a traceback)."""
    if cluster.replicas < 1:
        raise ValueError(f"config error: cluster.replicas must be >= 1, got {cluster.replicas}")
    if not cluster.num_cpus > 0:
        raise ValueError(f"config error: cluster.num_cpus must be > 0, got {cluster.num_cpus}")
    if cluster.num_gpus is not None and cluster.num_gpus < 0:
        raise ValueError(f"config error: cluster.num_gpus must be >= 0 or null, got {cluster.num_gpus}")
    for key in ("threads", "local_cpus", "start_timeout_s"):
        if cluster[key] is not None and cluster[key] < 1:
            raise ValueError(f"config error: cluster.{key} must be >= 1 or null, got {cluster[key]}")
    if cluster.kind == "ray" and not ray_installed():
        raise ValueError(RAY_INSTALL)


def _validate_model_choice(cfg: DictConfig) -> None:
    """A pretrained model needs a recipe of its own: the tiny demo's (``model=tiny_arith``) trains at 1e-3."""
    name, path = cfg.model.name, cfg.model.name_or_path
    if name == "tiny_arith" and path is not None:
        recipes = sorted(
            p.stem for p in (CONF_DIR / "model").glob("*.yaml") if p.stem not in ("tiny_arith", "hf")
        )
        raise ValueError(
            f"config error: model.name_or_path={path!r} with model=tiny_arith would fine-tune a pretrained "
            f"model with the tiny demo's recipe (trainer.lr={cfg.trainer.lr}); pick a model recipe "
            f"(model={' | '.join(recipes)}) or model=hf model.name_or_path={path}"
        )
    if name == "hf" and not path:
        raise ValueError("config error: model=hf needs model.name_or_path=<Hub id or local folder>")


def check_trainer(settings: DictConfig) -> None:
    """Checks the M-step settings the schema's types cannot express; raises ValueError naming the key.

    Called by :func:`validate` and by ``train.finetune.fine_tune`` itself (which tests and benchmarks call
    with settings that were never composed).
    """
    precision = str(settings.precision)
    if precision.endswith("-true") and precision not in ("32-true", "64-true"):
        raise ValueError(
            f"config error: trainer.precision={precision} would train the weights themselves in low "
            "precision (AdamW updates below its rounding step are lost); use bf16-mixed (fp32 master "
            "weights, bf16 autocast)"
        )
    if settings.epochs is not None and not settings.epochs > 0:
        raise ValueError(f"config error: trainer.epochs must be > 0 or null, got {settings.epochs}")
    if settings.lora.r < 0:
        raise ValueError(
            f"config error: trainer.lora.r must be >= 0 (0 = full fine-tuning), got {settings.lora.r}"
        )
    select = settings.get("select")
    if select is not None and select.every < 0:
        raise ValueError(f"config error: trainer.select.every must be >= 0 (0 = off), got {select.every}")
    if select is not None and select.every > 0:
        for key in ("patience", "num_problems"):
            if select[key] < 1:
                raise ValueError(f"config error: trainer.select.{key} must be >= 1, got {select[key]}")
    if settings.lora.r > 0 and settings.strategy == "fsdp":
        raise ValueError(
            "config error: trainer.lora.r > 0 with trainer.strategy=fsdp is not supported (the merge on "
            "export needs the whole model); use ddp: LoRA's gradients and optimizer state are small"
        )


def check_select_in_one_process(settings: DictConfig) -> None:
    """``trainer.select`` scores the model inside the training process: a fit that is launched over
    several processes (``train.launch``) cannot run it. Called when the fit starts (a config may compose
    with ddp/fsdp and selection and never train, e.g. ``--cfg job``)."""
    select = settings.get("select")
    if select is None or select.every <= 0:
        return
    one_process = (
        int(settings.get("num_nodes") or 1) == 1
        and str(settings.get("devices")) == "1"
        and settings.get("strategy") in ("auto", None)
    )
    if not one_process:
        raise ValueError(
            "config error: trainer.select.every > 0 scores the model in the training process: use "
            "trainer.devices=1, trainer.num_nodes=1 and trainer.strategy=auto, or trainer.select.every=0"
        )


def hydra_entry(run_fn: Callable[[DictConfig], dict]) -> Callable[[], None]:
    """Turns a plain ``run(cfg) -> dict`` into a console-script ``main`` (a thin ``@hydra.main``).

    The schemas are registered before Hydra composes, so a misspelt key fails naming the key.
    """

    def main() -> None:
        import hydra

        register_configs()

        @hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
        def _main(cfg: DictConfig) -> None:
            try:
                _use_sweep_job_dir(cfg)
                validate(cfg)
                run_fn(cfg)
            except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as err:
                # Bad input is reported in one line naming the problem; finished stages stay on disk.
                # (HYDRA_FULL_ERROR=1 still shows the traceback.)
                if os.environ.get("HYDRA_FULL_ERROR") == "1":
                    raise
                print(f"error: {err}", file=sys.stderr)
                sys.exit(1)

        _main()

    return main


def _use_sweep_job_dir(cfg: DictConfig) -> None:
    """In a multirun (``restem -m``), each job's run dir is its own sweep subdir, so points never share one."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode == RunMode.MULTIRUN:
        cfg.paths.run_dir = hydra_cfg.runtime.output_dir
