"""The torch device a config asks for."""
import torch

from utils.errors import UserError


def resolve_device(name):
    """'auto' (the GPU when there is one) | 'cpu' | 'cuda' -> torch.device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device='cuda' but no CUDA device is available")
    return torch.device(name)
