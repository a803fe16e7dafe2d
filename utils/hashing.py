"""Binarisation shared by the model, the baselines and the metrics."""
import torch


def binarize(x):
    """sign(x) with sign(0) = +1, so codes are exactly ±1 (never 0); keeps dtype and device."""
    return torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))
