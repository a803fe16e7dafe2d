"""Binarisation shared by the model, the baselines and the metrics."""
import torch


def binarize(x):
    """sign(x) with sign(0) = +1, so codes are exactly ±1 (never 0); keeps dtype and device.
    NaN stays NaN: a broken model or input must show in its codes, never pass as a bit."""
    ones = torch.ones_like(x)
    return torch.where(x >= 0, ones, torch.where(x < 0, -ones, x))
