"""Versions around training (learner/lifecycle.py): reconciled after a crash, rebased onto
the promoted version, gated against the parent they trained from."""

import threading
import time

import pytest

from strop.records import AdapterVersion
from tests.conftest import free_port
from tests.learner.harness import pair
from tests.service.harness import make_adapter


def test_reconcile_version_saved_before_crash_acked_registered_decided(make_learner):
    learner = make_learner()
    ids = [learner.r.xadd(learner.keys.pairs, pair(i).to_stream()) for i in range(3)]
    learner.feed.setup()
    read = [sid for sid, _ in learner.feed.read(2, 100)]  # delivered, so pending
    # a crash right after the rename: on disk, unregistered, records unacknowledged
    meta = AdapterVersion(
        version="v1", parent="base", path="", algorithm="dpo", consumed={learner.keys.pairs: read}
    )
    learner.store.write(meta, learner.policy.save)
    (learner.store.root / ".tmp-v2-0000").mkdir()  # and a later save cut short

    learner.start()

    assert learner.registry.get("v1").status == "promoted"
    assert learner.store.read("v1").gate["passed"] is True
    assert learner.feed.pending_ids() == set()
    assert learner.store.versions() == ["v1"] and not (learner.store.root / ".tmp-v2-0000").exists()
    assert learner.policy.parent == "v1"  # training goes on from the promoted version
    # the third record was never read: it is next
    assert [sid for sid, _ in learner.feed.read(5, 100)] == [ids[2]]


def test_decide_parent_replaced_during_training_candidate_rejected(make_learner, tiny_model_dir):
    learner = make_learner()
    learner.start()
    make_adapter(learner.store.path("v1"), tiny_model_dir, seed=1)
    learner.registry.add(AdapterVersion(version="v1", parent="base", path="x"))
    learner.registry.promote("v1")  # an operator promoted v1 while v2 trained from base
    meta = AdapterVersion(version="v2", parent="base", path="", algorithm="dpo")
    learner.store.write(meta, learner.policy.save)
    learner.registry.add(meta)

    decided = learner.lifecycle.decide(meta, candidate="default")

    assert decided.status == "rejected"
    assert decided.reason == "parent base is no longer promoted (v1 is)"
    assert learner.registry.get("v2").status == "rejected"
    assert learner.store.read("v2").reason == decided.reason
    assert learner.registry.promoted() == "v1"


def test_rebase_pointer_unchanged_keeps_weights_unless_discarded(make_learner):
    learner = make_learner()

    assert learner.lifecycle.rebase(discard=False) is False  # base, as the policy starts
    assert learner.lifecycle.rebase(discard=True) is True  # a new LoRA from base again
    assert learner.policy.parent == "base"


def test_rebase_promoted_version_missing_on_disk_raises(make_learner):
    learner = make_learner()
    learner.registry.add(AdapterVersion(version="v1", parent="base", path="x"))
    learner.registry.promote("v1")  # promoted, but its directory is gone

    with pytest.raises(FileNotFoundError, match="v1 is not in"):
        learner.lifecycle.rebase(discard=False)
    assert learner.policy.parent == "base"


def test_decide_service_unreachable_waits_undecided_then_decided_after_restart(make_learner):
    # Nothing listens on this port: every gate answer fails to connect.
    learner = make_learner(service_url=f"http://127.0.0.1:{free_port()}")
    learner.start()
    meta = AdapterVersion(version="v1", parent="base", path="", algorithm="dpo")
    learner.store.write(meta, learner.policy.save)
    learner.registry.add(meta)
    decided: list[AdapterVersion] = []
    gate = threading.Thread(
        target=lambda: decided.append(learner.lifecycle.decide(meta, "default"))
    )
    gate.start()

    deadline = time.time() + 30
    while learner.r.hget(learner.keys.learner_state, "waiting_for") != "service":
        assert time.time() < deadline, "the gate never said it waits for the service"
        time.sleep(0.05)
    time.sleep(1.5)  # at least one retry: still no verdict on missing evidence
    assert learner.registry.get("v1").status == "candidate"
    assert "passed" not in learner.store.read("v1").gate
    learner.stop.set()
    gate.join(10)
    assert decided[0].status == "candidate"  # stopped undecided

    # restarted with the service back: the version is gated and decided
    restarted = make_learner()
    restarted.start()
    assert restarted.registry.get("v1").status == "promoted"
    assert restarted.store.read("v1").gate["gate/probe_prompts"] > 0
