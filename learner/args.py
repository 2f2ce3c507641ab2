"""The learner's configuration (CleanRL's `Args`): its settings, plus its own few knobs.

Every learner setting (`algorithm`, `batch_size`, `dpo_beta`, `gate_kl_limit`, ...) is a
field of `strop.settings.Settings`, declared and documented once there (its learner
section), and read here as `args.batch_size`: `Args` holds the Settings object instead of
copying its fields. Declared below is only what is the learner's own: knobs no deployment
sets (tests and benchmarks do) and values derived from settings.

    args = Args(Settings(batch_size=4), read_block_ms=100)
    args.batch_size  # 4: a setting
    args.read_block_ms  # 100: the learner's own
    args.max_len  # 1280: derived, max_prompt_tokens + sample_max_tokens

Everything below the learner takes values from here (or as arguments), never from settings.
"""

from dataclasses import dataclass
from typing import Any

from strop.settings import Settings


@dataclass
class Args:
    settings: Settings
    """The process's settings; the learner's are read through `args.<name>` (see below)."""

    # --- training ---------------------------------------------------------------------------
    micro_batch_size: int | None = None
    """Records per forward/backward pass (gradients accumulate over the batch's passes):
    less memory, the same update. None: the whole batch in one pass. (Not a setting yet:
    move it to Settings if deployments need it.)"""
    max_grad_norm: float = 1.0
    """Gradients are clipped to this norm (one noisy batch must not wreck an adapter)."""
    seed: int = 0
    """Seeds torch for the new-LoRA initialisation and dropout."""

    # --- gate -------------------------------------------------------------------------------
    gate_max_tokens: int = 32
    """Length of the probe answers (short: the gate runs on CPU too)."""
    gate_judge_tokens: int = 64
    """Length of one judgment of a probe answer."""

    # --- rollback ---------------------------------------------------------------------------
    rollback_check_s: float = 10.0
    """How often the learner runs the rollback check and the collapse guard."""

    # --- plumbing ---------------------------------------------------------------------------
    consumer: str = "learner-0"
    """Stable consumer name, so a restarted learner re-reads its own pending records."""
    read_block_ms: int = 1000
    """Longest wait for new records in one read (housekeeping runs in between)."""
    disk_retry_s: float = 10.0
    """How often a learner whose adapter directory cannot take a version checks again."""

    # --- derived: filled in from the settings unless given -----------------------------------
    max_len: int = 0
    """Longest prompt + completion in tokens; longer sequences are cut from the left.
    0: max_prompt_tokens + sample_max_tokens (the worker drops longer prompts and caps
    completions, so this fits every record)."""

    def __post_init__(self) -> None:
        if not self.max_len:
            self.max_len = self.settings.max_prompt_tokens + self.settings.sample_max_tokens

    def __getattr__(self, name: str) -> Any:
        """A setting, e.g. `args.batch_size` (called only for names not declared above)."""
        if name in Settings.model_fields:
            return getattr(self.settings, name)
        raise AttributeError(f"Args has no field or setting {name!r}")

    def hyperparameters(self) -> dict:
        """What a version's metadata records about how it was trained."""
        keys = ["algorithm", "batch_size", "micro_batch_size", "steps_per_version"]
        keys += ["learning_rate", "average_steps", "max_grad_norm"]
        keys += ["max_len", "seed", "lora_rank", "lora_alpha", "lora_target_modules"]
        if self.algorithm == "dpo":
            keys += ["dpo_beta", "dpo_loss"]
        else:
            keys += ["grpo_clip", "grpo_kl_coef", "grpo_iterations", "grpo_decoupled"]
            keys += ["grpo_length_reward", "grpo_overlong_penalty"]
            keys += ["max_staleness"]
        return {k: getattr(self, k) for k in keys}
