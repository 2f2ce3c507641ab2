import pytest

from strop.settings import Settings
from tests.conftest import MODEL_CACHE, REDIS_URL
from tests.service.harness import make_adapter

API_KEY = "sk-test-user-key"
ADMIN_KEY = "sk-test-admin-key"


@pytest.fixture(scope="session")
def adapter_root(tmp_path_factory, tiny_model_dir):
    """An adapter directory holding v1 and v2 of the tiny model."""
    root = tmp_path_factory.mktemp("adapters")
    make_adapter(root / "v1", tiny_model_dir, seed=1)
    make_adapter(root / "v2", tiny_model_dir, seed=2)
    return root


@pytest.fixture
def settings(redis_prefix, tiny_model_dir, adapter_root):
    return Settings(
        redis_url=REDIS_URL,
        redis_prefix=redis_prefix,
        model=str(tiny_model_dir),
        model_cache_dir=MODEL_CACHE,
        adapter_dir=adapter_root,
        api_keys=[API_KEY],
        admin_key=ADMIN_KEY,
        max_n=8,
        max_tokens_limit=256,
        default_max_tokens=16,
        max_context=512,
        adapter_poll_s=0.2,
    )
