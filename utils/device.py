"""The torch device a config asks for, and the host allocator's settings for CPU training."""
import ctypes
import os
import platform

import torch

from utils.errors import UserError


def resolve_device(name):
    """'auto' (the GPU when there is one) | 'cpu' | 'cuda' -> torch.device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device='cuda' but no CUDA device is available")
    return torch.device(name)


# glibc's malloc options (malloc.h)
_M_MMAP_THRESHOLD, _M_ARENA_MAX = -3, -8
HOST_MMAP_THRESHOLD = 8 << 20


def return_freed_host_memory():
    """Make glibc's malloc give large freed blocks back to the system (elsewhere: nothing).

    A training step on the CPU allocates and frees thousands of tensors of a few MB. With glibc's
    defaults (a heap per thread, and a mmap threshold that rises to 32 MiB after the first large
    block is freed) the freed blocks stay in the heaps, fragmented: on ucf_dev the resident
    memory of identical runs peaked anywhere from 2.4 to 5.5 GB for a live set near 1.5 GB. One
    heap and a fixed threshold of 8 MiB (blocks at least that large are mapped and unmapped on
    their own) kept it at 2.2-2.9 GB at the same speed, 1.9 GB since the plain scan recomputes
    its states; a lower threshold saves more but every mapping costs page faults. glibc settings in the
    environment take precedence. README, "Training, evaluation, preprocessing".
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return
    if any(name in os.environ for name in ("MALLOC_ARENA_MAX", "MALLOC_MMAP_THRESHOLD_",
                                           "GLIBC_TUNABLES")):
        return                                      # the user's own settings win
    mallopt = ctypes.CDLL(None).mallopt
    mallopt(_M_ARENA_MAX, 1)
    mallopt(_M_MMAP_THRESHOLD, HOST_MMAP_THRESHOLD)
