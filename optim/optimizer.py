"""AdamW and the cosine learning-rate schedule of docs/method.md §6."""
import math

import torch

from utils.checkpoint import load_weights


def build_optimizer(cfg, model, criterion, graphs=False):
    """AdamW over every trainable parameter (weight decay on all): the fused kernel when every
    parameter is on CUDA. For CUDA-graph replay (`graphs`) it is also capturable and its learning
    rate a device tensor, which `set_epoch_lr` changes in place between replays."""
    t = cfg.train
    params = [p for p in list(model.parameters()) + list(criterion.parameters()) if p.requires_grad]
    fused = all(p.is_cuda for p in params)
    lr = torch.tensor(t.lr, device=params[0].device) if graphs else t.lr
    return torch.optim.AdamW(params, lr=lr, betas=tuple(t.betas), weight_decay=t.weight_decay,
                             fused=fused or None, foreach=None if fused else False,
                             capturable=graphs)


def cosine_lr(cfg, epoch):
    """Learning rate of epoch `epoch` (0-based): cosine annealing from train.lr to train.min_lr
    over train.num_epochs, in closed form (the schedule of torch's CosineAnnealingLR, stepped per
    epoch, without its state)."""
    t = cfg.train
    return t.min_lr + (t.lr - t.min_lr) * (1 + math.cos(math.pi * epoch / t.num_epochs)) / 2


def set_epoch_lr(optimizer, lr):
    """Set every group's learning rate (in place where it is a device tensor, for graph replay)."""
    for group in optimizer.param_groups:
        if torch.is_tensor(group["lr"]):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


def load_optimizer_state(optimizer, state, path):
    """optimizer.load_state_dict(state), a mismatch being one line naming the checkpoint `path`.
    A learning rate that is a device tensor (graph replay reads it) stays that tensor, now
    holding the loaded rate: load_state_dict alone would put the checkpoint's host copy in its
    place, and a graph captured afterwards would keep one rate for the rest of the run."""
    rates = [group["lr"] for group in optimizer.param_groups]
    load_weights(optimizer, state, path)
    for group, rate in zip(optimizer.param_groups, rates):
        if torch.is_tensor(rate):
            rate.fill_(float(group["lr"]))
            group["lr"] = rate
