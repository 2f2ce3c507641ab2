"""The Redis contracts: key and stream names, and the schema of every record stored there.

Streams hold one field, `data`, with a record's JSON. Every record carries a
`schema_version` so readers can refuse what they do not understand.
"""

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, Field

SCHEMA_VERSION = 1


class Keys:
    """Every Redis key strop uses, under one prefix (tests use a fresh prefix each)."""

    def __init__(self, prefix: str = "strop:"):
        self.prefix = prefix
        self.prompt_log = f"{prefix}log"  # stream of PromptLogRecord
        self.groups = f"{prefix}groups"  # stream of ScoredGroup
        self.pairs = f"{prefix}pairs"  # stream of PreferencePair
        self.versions = f"{prefix}versions"  # hash: "vN" -> AdapterVersion JSON
        self.promoted = f"{prefix}promoted"  # string: "vN" of the promoted version
        self.next_version = f"{prefix}next_version"  # counter for new version numbers
        self.events = f"{prefix}events"  # stream of RegistryEvent (history)
        self.events_channel = f"{prefix}events"  # pub/sub channel of RegistryEvent (wake-up)
        self.ingest_group = "ingest"  # consumer group of the worker on the prompt log
        self.learner_group = "learner"  # consumer group of the learner on groups/pairs
        self.dedupe = f"{prefix}dedupe:"  # + prompt hash: recently seen prompts
        self.built = f"{prefix}built:"  # + idempotency key: groups already written
        self.logged = f"{prefix}logged:"  # + request id: prompt-log records already written
        self.feedback = f"{prefix}feedback"  # stream of FeedbackRecord (worker: late feedback)
        self.feedback_of = f"{prefix}feedback:"  # + request id: the latest FeedbackRecord JSON
        self.feedback_count = f"{prefix}feedback_count:"  # + request id: how often it was rated
        self.nolog = f"{prefix}nolog:"  # + request id: key id of a request not logged (opt-out)
        self.feedback_rate = f"{prefix}feedback_rate:"  # + key id:minute: feedback requests counted
        self.feedback_trust = f"{prefix}feedback_trust"  # hash: agree:<key id>, disagree:<key id>
        self.series = f"{prefix}ts:"  # + metric name: time series (sorted sets)
        self.learner_state = f"{prefix}learner:state"  # hash: what the learner is doing
        self.halted = f"{prefix}halted"  # string: PromotionHalt JSON while promotion is halted
        self.key_id_secret = f"{prefix}key_id_secret"  # string: HMAC secret of logged key ids


def new_request_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


class Record(BaseModel):
    schema_version: int = SCHEMA_VERSION

    def to_stream(self) -> dict[str, str]:
        return {"data": self.model_dump_json()}

    @classmethod
    def from_stream(cls, fields: dict) -> "Record":
        raw = fields.get("data", fields.get(b"data"))
        return cls.model_validate_json(raw)


class SamplingRecord(BaseModel):
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int | None = None
    stop: list[str] = Field(default_factory=list)
    seed: int | None = None
    logprobs: bool = False


class PromptLogRecord(Record):
    """One user request to the chat API, as the prompt log keeps it."""

    request_id: str
    time: float = Field(default_factory=time.time)
    messages: list[dict[str, Any]]
    sampling: SamplingRecord
    responses: list[str]
    finish_reasons: list[str] = Field(default_factory=list)
    model: str  # the name the caller asked for (`strop`, `strop@v3`, `base`)
    version: str  # what served it: `base` or `vN`
    prompt_tokens: int
    completion_tokens: int
    latency_ms: float
    key_id: str  # an HMAC of the caller's key (service/auth.py), never the key
    stream: bool = False
    internal: bool = False  # the worker's own sampling/judging (never written, kept for clarity)


class FeedbackRecord(Record):
    """A caller's verdict on one of its own chat completions (POST /v1/strop/feedback).

    Only the latest one per request counts; `revision` says how many came before it."""

    request_id: str  # the chat completion's id (`chatcmpl-...`)
    choice: int = 0
    score: float | None = None  # -1..1; thumbs up is 1, down is -1
    answer: str | None = None  # the correct final answer, as the user states it
    preferred: str | None = None  # a better reply than the one served
    key_id: str  # the caller's key id (the same HMAC as PromptLogRecord.key_id)
    version: str | None = None  # what served the rated reply, when known
    revision: int = 1
    time: float = Field(default_factory=time.time)


class ScoredGroup(Record):
    """G completions of one prompt, sampled by one version and rewarded (worker -> learner)."""

    group_id: str  # idempotency key: hash of the prompt-log id and settings
    log_id: str  # stream id of the prompt-log entry it came from
    messages: list[dict[str, Any]]
    completions: list[str]
    completion_token_ids: list[list[int]] = Field(default_factory=list)
    token_logprobs: list[list[float]] = Field(default_factory=list)
    # one per completion: False where the engine cut it at max_tokens, so no eos follows
    # it; empty: not known (groups written before 2026-12-07), every one taken as ended
    completion_finished: list[bool] = Field(default_factory=list)
    rewards: list[float]
    version: str  # the behaviour policy: `base` or `vN`
    method: Literal["ttrl", "judge", "gold"]
    majority_label: str | None = None
    majority_ratio: float | None = None
    judge_scores: list[float | None] | None = None
    weight: float = 1.0  # multiplies the group's loss: `feedback_weight` with user feedback
    feedback: dict[str, Any] | None = None  # the FeedbackRecord it was built with, if any
    time: float = Field(default_factory=time.time)


class PreferencePair(Record):
    """A chosen/rejected pair derived from a scored group."""

    group_id: str
    messages: list[dict[str, Any]]
    chosen: str
    rejected: str
    chosen_reward: float
    rejected_reward: float
    version: str
    method: Literal["ttrl", "judge", "gold"]
    # whether the model ended each side (finish_reason "stop"), not cut at max_tokens:
    # the learner appends eos only after an ended side; True for pairs older than the flags
    chosen_finished: bool = True
    rejected_finished: bool = True
    weight: float = 1.0  # multiplies the pair's loss: `feedback_weight` with user feedback
    feedback: dict[str, Any] | None = None  # the FeedbackRecord it was built with, if any
    time: float = Field(default_factory=time.time)


VersionStatus = Literal["candidate", "promoted", "rejected", "rolled_back"]


class AdapterVersion(Record):
    """One adapter version as the registry knows it (mirrors its metadata file on disk)."""

    version: str  # "vN"
    parent: str  # "base" or "vM"
    status: VersionStatus = "candidate"
    path: str
    created: float = Field(default_factory=time.time)
    algorithm: str = ""
    hyperparameters: dict[str, Any] = Field(default_factory=dict)
    consumed: dict[str, list[str]] = Field(default_factory=dict)  # stream -> ids
    train_metrics: dict[str, float] = Field(default_factory=dict)
    gate: dict[str, Any] = Field(default_factory=dict)
    reason: str | None = None


class RegistryEvent(Record):
    """A change in the registry: promoted, rejected, rolled_back, candidate; halted and
    resumed (promotion stopped by the collapse guard, and allowed again by an operator)."""

    kind: Literal["candidate", "promoted", "rejected", "rolled_back", "halted", "resumed"]
    version: str
    previous: str | None = None
    reason: str | None = None
    time: float = Field(default_factory=time.time)


class PromotionHalt(Record):
    """Why promotion is halted: the collapse guard tripped on `version` and rolled `strop`
    back to `rolled_back_to`. While it is set no version is promoted; `strop adapters
    resume` clears it."""

    version: str  # the version that tripped the guard
    rolled_back_to: str  # `base` or vN: the last good version
    reason: str  # which signals tripped, with their values
    signals: dict[str, float] = Field(default_factory=dict)
    time: float = Field(default_factory=time.time)
