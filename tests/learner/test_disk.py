"""The learner and an adapter directory that cannot take a version (read-only, full, or
gone): it says so in one line, trains nothing it cannot save, loses no record and uses up
no version number.

The directory is made unwritable for real by putting a plain file where it should be (a
chmod would not stop the root user these tests may run as).
"""

import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from strop.records import Keys
from tests.conftest import MODEL_CACHE, REDIS_URL
from tests.learner.harness import pair

ROOT = Path(__file__).resolve().parents[2]


def wait_for(predicate, timeout: float = 120.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return bool(predicate())


def block(directory: Path) -> Path:
    """Put a file where `directory` is (moving the directory aside); returns the aside."""
    aside = directory.with_name(directory.name + "-aside")
    if directory.exists():
        directory.rename(aside)
    else:
        aside.mkdir()
    directory.write_text("not a directory\n")
    return aside


def unblock(directory: Path, aside: Path) -> None:
    directory.unlink()
    aside.rename(directory)


def error_lines(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.ERROR and r.name.startswith("strop")]


def test_learner_adapter_dir_not_writable_exits_at_start_with_one_line(
    tiny_model_dir, redis_prefix, redis_client, tmp_path
):
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith("STROP_")}
    env.update(
        STROP_REDIS_URL=REDIS_URL,
        STROP_REDIS_PREFIX=redis_prefix,
        STROP_MODEL=str(tiny_model_dir),
        STROP_MODEL_CACHE_DIR=str(MODEL_CACHE),
        STROP_ADAPTER_DIR=str(blocker / "adapters"),
        STROP_DEVICE="cpu",
        STROP_LEARNER_METRICS_PORT="0",
    )
    out = subprocess.run(
        [sys.executable, "-m", "ops.cli", "learner"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    errors = [line for line in out.stderr.splitlines() if "level=error" in line]
    assert len(errors) == 1, out.stderr
    assert "STROP_ADAPTER_DIR" in errors[0] and "not writable" in errors[0]
    assert str(blocker / "adapters") in errors[0]
    # nothing was started: no version number handed out, no learner state
    keys = Keys(redis_prefix)
    assert redis_client.get(keys.next_version) is None
    assert not redis_client.exists(keys.learner_state)


def test_learner_adapter_dir_unwritable_trains_nothing_until_it_is_back(
    make_learner, redis_client, caplog
):
    caplog.set_level(logging.INFO, logger="strop")
    learner = make_learner(disk_retry_s=0.2)
    keys, root = learner.keys, learner.store.root
    learner.start()
    aside = block(root)
    ids = [redis_client.xadd(keys.pairs, pair(i).to_stream()) for i in range(2)]
    runner = threading.Thread(target=learner.run, kwargs={"max_versions": 1}, daemon=True)
    runner.start()
    try:
        assert wait_for(
            lambda: (
                "no version can be saved" in (redis_client.hget(keys.learner_state, "error") or "")
            )
        )
        time.sleep(1.0)  # several checks later: still waiting, one line said why
        assert runner.is_alive()
        assert learner.feed.pending_ids() == set()  # no record read, so none trained on
        assert redis_client.get(keys.next_version) is None
        errors = error_lines(caplog)
        assert len(errors) == 1 and errors[0].exc_info is None
        assert "not writable" in errors[0].getMessage() and str(root) in errors[0].getMessage()
    finally:
        unblock(root, aside)

    runner.join(600)
    assert not runner.is_alive()
    assert learner.versions_written == ["v1"]
    assert learner.store.read("v1").consumed == {keys.pairs: ids}
    assert learner.feed.pending_ids() == set()
    assert not redis_client.hexists(keys.learner_state, "error")


def test_learner_save_fails_records_stay_pending_number_kept_then_v1_saved(
    make_learner, redis_client, caplog
):
    caplog.set_level(logging.INFO, logger="strop")
    learner = make_learner(disk_retry_s=0.1)
    keys, root = learner.keys, learner.store.root
    learner.start()
    redis_client.delete(keys.learner_state)
    outcome: dict = {}
    trainer = threading.Thread(
        target=lambda: outcome.update(meta=learner.train_version()), daemon=True
    )
    trainer.start()
    # past its disk check, it waits for records: the directory goes away only now
    assert wait_for(lambda: redis_client.hget(keys.learner_state, "phase") == "waiting")
    aside = block(root)
    ids = [redis_client.xadd(keys.pairs, pair(i).to_stream()) for i in range(2)]
    trainer.join(600)

    try:
        assert outcome == {"meta": None}  # trained, not saved: no exception escaped
        assert learner.registry.all() == []
        assert int(redis_client.get(keys.next_version) or 0) == 0  # v1 handed back
        assert learner.feed.pending_ids() == set(ids)  # not acknowledged: not lost
        assert "v1 not saved" in redis_client.hget(keys.learner_state, "error")
        errors = error_lines(caplog)
        assert len(errors) == 1 and errors[0].exc_info is None
        assert "v1 not saved" in errors[0].getMessage()
        assert "2 records stay pending" in errors[0].getMessage()
    finally:
        unblock(root, aside)

    # the directory is back: the same two records make v1, the number nothing used
    meta = learner.train_version()
    assert meta.version == "v1"
    assert sorted(meta.consumed[keys.pairs]) == sorted(ids)
    assert learner.feed.pending_ids() == set()
    assert not redis_client.hexists(keys.learner_state, "error")
