"""The adapter store: versions appear complete or not at all."""

import json
import os

import pytest

from strop.adapters import META, AdapterStore
from strop.records import AdapterVersion


def _meta(version: str) -> AdapterVersion:
    return AdapterVersion(
        version=version,
        parent="base",
        path="",
        algorithm="dpo",
        consumed={"s:pairs": ["1-0", "2-0"]},
        train_metrics={"loss/dpo": 0.69},
    )


def _save_files(tmp) -> None:
    (tmp / "adapter_config.json").write_text("{}")
    (tmp / "adapter_model.safetensors").write_bytes(b"weights")


def test_store_write_publishes_complete_version_with_metadata(tmp_path):
    store = AdapterStore(tmp_path / "adapters")
    final = store.write(_meta("v1"), _save_files)

    assert final == store.path("v1")
    assert sorted(p.name for p in final.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        META,
    ]
    meta = store.read("v1")
    assert meta.consumed == {"s:pairs": ["1-0", "2-0"]}
    assert meta.path == str(final.resolve())
    assert store.versions() == ["v1"]
    assert [p.name for p in store.root.iterdir()] == ["v1"]  # no temporary left


def test_store_write_failing_save_leaves_nothing(tmp_path):
    store = AdapterStore(tmp_path)

    def broken(tmp):
        _save_files(tmp)
        raise OSError("disk full")

    with pytest.raises(OSError):
        store.write(_meta("v1"), broken)
    assert list(tmp_path.iterdir()) == []


def test_store_write_before_rename_sees_only_temporary(tmp_path):
    store = AdapterStore(tmp_path)
    seen = {}

    def check(tmp):
        seen["tmp"] = tmp.name
        seen["versions"] = store.versions()

    store.write(_meta("v3"), _save_files, before_rename=check)
    assert seen["tmp"].startswith(".tmp-v3-")
    assert seen["versions"] == []  # until the rename, no reader sees v3


def test_store_write_existing_version_refuses(tmp_path):
    store = AdapterStore(tmp_path)
    store.write(_meta("v1"), _save_files)
    with pytest.raises(FileExistsError):
        store.write(_meta("v1"), _save_files)


def test_store_clean_removes_crash_debris_only(tmp_path):
    store = AdapterStore(tmp_path)
    store.write(_meta("v1"), _save_files)
    (tmp_path / ".tmp-v2-deadbeef").mkdir()
    (tmp_path / ".tmp-v2-deadbeef" / "adapter_config.json").write_text("{}")
    (store.path("v1") / ".tmp-strop.json-1234").write_text("half")

    removed = store.clean()

    assert sorted(p.name for p in removed) == [".tmp-strop.json-1234", ".tmp-v2-deadbeef"]
    assert [p.name for p in tmp_path.iterdir()] == ["v1"]
    assert sorted(p.name for p in store.path("v1").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        META,
    ]


def test_store_highest_counts_debris_so_numbers_are_never_reused(tmp_path):
    store = AdapterStore(tmp_path)
    assert store.highest() == 0
    store.write(_meta("v2"), _save_files)
    (tmp_path / ".tmp-v5-0badc0de").mkdir()
    assert store.highest() == 5
    assert store.versions() == ["v2"]


def test_store_update_replaces_metadata(tmp_path):
    store = AdapterStore(tmp_path)
    store.write(_meta("v1"), _save_files)
    meta = store.read("v1")
    meta.status, meta.gate = "rejected", {"passed": False, "gate/kl": 3.0}
    meta.reason = "KL too high"

    store.update(meta)

    on_disk = json.loads((store.path("v1") / META).read_text())
    assert on_disk["status"] == "rejected" and on_disk["gate"]["gate/kl"] == 3.0
    assert sorted(os.listdir(store.path("v1"))) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        META,
    ]
