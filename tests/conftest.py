import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tests.tiny_models import CALIB_FILE, EVAL_FILE, make_tiny_model, train_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(d)
    return d


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory, tokenizer_dir):
    """make(arch, **overrides) -> path of a tiny random model directory (cached per arguments)."""
    cache: dict = {}

    def make(arch: str = "llama", **kw) -> Path:
        key = (arch, tuple(sorted(kw.items())))
        if key not in cache:
            d = tmp_path_factory.mktemp(f"tiny-{arch}")
            cache[key] = make_tiny_model(d, arch=arch, tokenizer_dir=tokenizer_dir, **kw)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def calib_file() -> Path:
    if not CALIB_FILE.exists():
        pytest.skip("shared/data is not beside the checkout")
    return CALIB_FILE


@pytest.fixture(scope="session")
def eval_file() -> Path:
    if not EVAL_FILE.exists():
        pytest.skip("shared/data is not beside the checkout")
    return EVAL_FILE
