"""Version names, in one place: how adapter versions and the model names that reach them
are spelled.

- `vN`: an adapter version (N counts up from 1 and is never reused);
- `base`: the base model, no adapter (version 0 where versions are counted);
- `strop`: the model name of the promoted version;
- `strop@vN`: the model name that pins version N;
- `strop-vN`: the adapter name an engine loads version N under (vLLM serves stale weights
  or stale prefix cache when an adapter is reloaded under the same name, so every version
  gets its own).
"""

import re

BASE = "base"
PROMOTED_MODEL = "strop"
PINNED_PREFIX = "strop@"

_VERSION_RE = re.compile(r"^v(\d+)$")


def is_version(name: str) -> bool:
    """Whether `name` is an adapter version (`vN`)."""
    return bool(_VERSION_RE.match(name))


def version_name(n: int) -> str:
    """Version N's name: `vN`."""
    return f"v{n}"


def version_number(version: str) -> int:
    """`vN` -> N, `base` -> 0 (staleness and ordering count in version numbers)."""
    if version == BASE:
        return 0
    match = _VERSION_RE.match(version)
    if match is None:
        raise ValueError(f"not a version name: {version!r}")
    return int(match.group(1))


def pinned_model(version: str) -> str:
    """The model name a response carries: `base` stays, `vN` -> `strop@vN`; any other
    (externally loaded) adapter name is its own model name."""
    return PINNED_PREFIX + version if is_version(version) else version


def version_of_model(model: str) -> str:
    """The version a model name served: `strop@v3` -> `v3`; `base` and other names as is."""
    return model.removeprefix(PINNED_PREFIX)


def engine_adapter_name(version: str) -> str:
    """The engine-side adapter name of version `vN`: `strop-vN`, unique per version."""
    return f"strop-{version}"
