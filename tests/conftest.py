import os
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# Without a GPU, Triton kernels run in Triton's interpreter, so the CPU suite checks their
# arithmetic too. Triton reads the switch when a kernel is defined: set it before any import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from utils.config import build_config  # noqa: E402

DEMO_CONFIG = os.path.join(ROOT, "configs", "S5VH", "demo.py")


@pytest.fixture(autouse=True, scope="session")
def hash_cache(tmp_path_factory):
    """The suite's own digest cache (utils.content_hash), never the user's."""
    folder = tmp_path_factory.mktemp("hash_cache")
    old = os.environ.get("S5VH_CACHE_DIR")
    os.environ["S5VH_CACHE_DIR"] = str(folder)
    yield folder
    if old is None:
        del os.environ["S5VH_CACHE_DIR"]
    else:
        os.environ["S5VH_CACHE_DIR"] = old


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def tiny_config(tmp_path, *overrides, config=DEMO_CONFIG):
    """The demo config pointed at tmp_path, with extra `--cfg-options` items."""
    return build_config(config, [f"data_root={str(tmp_path)!r}",
                                 f"work_dir={str(tmp_path / 'runs')!r}", *overrides])
