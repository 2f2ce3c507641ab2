"""The adapter store: one directory per version, `adapter_dir/vN`, never half written.

A version directory holds the PEFT files (adapter_config.json, adapter_model.safetensors)
and `strop.json`, its metadata (an `AdapterVersion`: parent, stream ids consumed,
algorithm and hyperparameters, training and gate metrics, time). It is written under a
temporary name (`.tmp-vN-<uuid>`), every file fsynced, then renamed into place: a rename
within one directory is atomic, so a reader (the service, a restarted learner) sees either
no `vN` or a complete one. Leftover temporary directories are debris from a crash and are
removed by `clean()`.

The registry in Redis is the authority on a version's status once it is registered;
`strop.json` records what the learner decided (gate result), so a wiped registry can be
rebuilt from disk. The learner writes versions; the service and the CLI only read them.
"""

import contextlib
import logging
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

from strop.records import AdapterVersion
from strop.versions import is_version, version_number

log = logging.getLogger("strop.adapters")

META = "strop.json"
TMP_PREFIX = ".tmp-"


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """fsync every file, then every directory bottom-up, so the rename publishes data
    that is already on disk (otherwise a power cut could leave a complete-looking vN with
    empty files)."""
    for dirpath, _, filenames in os.walk(root, topdown=False):
        for name in filenames:
            _fsync_path(Path(dirpath) / name)
        _fsync_path(Path(dirpath))


class AdapterStore:
    def __init__(self, root: Path):
        self.root = Path(root)

    def path(self, version: str) -> Path:
        return self.root / version

    def versions(self) -> list[str]:
        """Versions the learner wrote (with metadata), oldest first."""
        if not self.root.is_dir():
            return []
        found = [p.name for p in self.root.iterdir() if self.has_metadata(p.name)]
        return sorted(found, key=version_number)

    def has_metadata(self, version: str) -> bool:
        """Whether the learner wrote `version` (its `strop.json` is there)."""
        return is_version(version) and (self.path(version) / META).exists()

    def has_adapter(self, version: str) -> bool:
        """Whether `version` can be loaded (also one put there by hand, without metadata)."""
        return is_version(version) and (self.path(version) / "adapter_config.json").exists()

    def loadable(self) -> list[str]:
        """Versions that can be loaded, with or without metadata, oldest first."""
        if not self.root.is_dir():
            return []
        return sorted(
            (p.name for p in self.root.iterdir() if self.has_adapter(p.name)), key=version_number
        )

    def highest(self) -> int:
        """The highest version number on disk, 0 when there is none (also counts debris,
        so a number a crashed save used is not handed out twice)."""
        if not self.root.is_dir():
            return 0
        numbers = [0]
        for p in self.root.iterdir():
            name = p.name.removeprefix(TMP_PREFIX).split("-")[0]
            if is_version(name):
                numbers.append(version_number(name))
        return max(numbers)

    def read(self, version: str) -> AdapterVersion:
        return AdapterVersion.model_validate_json((self.path(version) / META).read_text())

    def write(
        self,
        meta: AdapterVersion,
        save: Callable[[Path], None],
        before_rename: Callable[[Path], None] | None = None,
    ) -> Path:
        """Write version `meta.version`: `save(tmp_dir)` writes the PEFT files, then the
        metadata; fsync; rename to `vN`. Returns the final path."""
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.path(meta.version)
        if final.exists():
            raise FileExistsError(f"{final} exists: version numbers are never reused")
        tmp = self.root / f"{TMP_PREFIX}{meta.version}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            save(tmp)
            meta.path = str(final.resolve())
            (tmp / META).write_text(meta.model_dump_json(indent=2))
            _fsync_tree(tmp)
            if before_rename is not None:
                before_rename(tmp)
            os.rename(tmp, final)
            _fsync_path(self.root)  # make the rename itself durable
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info("wrote %s", final)
        return final

    def update(self, meta: AdapterVersion) -> None:
        """Replace the metadata of an existing version (gate result), atomically."""
        target = self.path(meta.version) / META
        tmp = target.with_name(f"{TMP_PREFIX}{META}-{uuid.uuid4().hex[:8]}")
        tmp.write_text(meta.model_dump_json(indent=2))
        _fsync_path(tmp)
        os.replace(tmp, target)
        _fsync_path(target.parent)

    def clean(self) -> list[Path]:
        """Remove what a crash can leave: temporary version dirs and metadata files."""
        removed: list[Path] = []
        if not self.root.is_dir():
            return removed
        debris = [p for p in self.root.iterdir() if p.name.startswith(TMP_PREFIX)]
        for version in self.versions():
            debris += [p for p in self.path(version).iterdir() if p.name.startswith(TMP_PREFIX)]
        for p in debris:
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
            removed.append(p)
            log.warning("removed %s (left by an interrupted save)", p)
        return removed
