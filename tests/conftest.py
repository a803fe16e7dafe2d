import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from utils.config import build_config  # noqa: E402

DEMO_CONFIG = os.path.join(ROOT, "configs", "S5VH", "demo.py")


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def tiny_config(tmp_path, *overrides, config=DEMO_CONFIG):
    """The demo config pointed at tmp_path, with extra `--cfg-options` items."""
    return build_config(config, [f"data_root={str(tmp_path)!r}",
                                 f"work_dir={str(tmp_path / 'runs')!r}", *overrides])
