"""Learners on the tiny model for tests, and the records they train on."""

from collections.abc import Callable, Iterator
from pathlib import Path

from learner.args import Args
from learner.loop import Learner, build
from strop.records import PreferencePair, ScoredGroup
from strop.settings import Settings
from tests.conftest import MODEL_CACHE, REDIS_URL
from tests.service.harness import ServerThread

# A gate that runs every check but cannot fail on the tiny model's noise: its logits are
# nearly flat (KL stays tiny) and its gibberish never parses as a score (reward skipped).
QUICK = dict(
    algorithm="dpo",  # the tests write pairs
    batch_size=2,
    steps_per_version=1,
    learning_rate=1e-3,
    gate_probe_size=2,
    gate_max_tokens=4,
    gate_judge_tokens=4,
    gate_kl_limit=1.0,
    read_block_ms=100,
    max_len=256,
    lora_target_modules=["q_proj", "v_proj"],
)


def pair(i: int) -> PreferencePair:
    """A preference pair whose chosen answer is longer and better rewarded."""
    return PreferencePair(
        group_id=f"g{i}",
        messages=[{"role": "user", "content": f"Question number {i}?"}],
        chosen=f"A careful answer to {i}.",
        rejected="no",
        chosen_reward=4.0,
        rejected_reward=1.0,
        version="base",
        method="judge",
    )


def group(i: int, version: str) -> ScoredGroup:
    """A group of four answers to `i + i` sampled by `version`, two right and two wrong."""
    return ScoredGroup(
        group_id=f"g{i}",
        log_id="1-0",
        messages=[{"role": "user", "content": f"What is {i} + {i}?"}],
        completions=[f"{2 * i}", "7", f"It is {2 * i}.", "dunno"],
        rewards=[1.0, 0.0, 1.0, 0.0],
        version=version,
        method="ttrl",
    )


def service_settings(model_dir: Path, redis_prefix: str, adapters: Path) -> Settings:
    """A service on the learner's Redis prefix and adapter directory: what its gate asks."""
    return Settings(
        redis_url=REDIS_URL,
        redis_prefix=redis_prefix,
        model=str(model_dir),
        model_cache_dir=MODEL_CACHE,
        adapter_dir=adapters,
        max_context=512,
        adapter_poll_s=0.2,
    )


def learners(
    model_dir: Path, redis_prefix: str, tmp_path: Path, engine=None
) -> Iterator[Callable[..., Learner]]:
    """Yield `make(**overrides)`, which builds a learner on the tiny model with QUICK and
    `overrides` (each to Settings or Args, wherever it is declared); then close them.
    With an `engine`, a real service on the same prefix and adapter directory serves the
    learner's gate (started with the first learner, stopped after the last)."""
    built: list[Learner] = []
    servers: list[ServerThread] = []
    adapters = tmp_path / "adapters"

    def service_url() -> str:
        if not servers:
            settings = service_settings(model_dir, redis_prefix, adapters)
            servers.append(ServerThread(settings, engine).__enter__())
        return servers[0].url

    def make(**overrides) -> Learner:
        kw = QUICK | overrides
        if engine is not None and "service_url" not in kw:
            kw["service_url"] = service_url()
        settings = Settings(
            redis_url=REDIS_URL,
            redis_prefix=redis_prefix,
            model=str(model_dir),
            model_cache_dir=MODEL_CACHE,
            adapter_dir=adapters,
            device="cpu",
            **{k: v for k, v in kw.items() if k in Settings.model_fields},
        )
        args = Args(settings, **{k: v for k, v in kw.items() if k not in Settings.model_fields})
        learner = build(settings, args)
        built.append(learner)
        return learner

    yield make
    for learner in built:
        learner.r.close()
    for server in servers:
        server.__exit__(None, None, None)
