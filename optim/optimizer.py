"""AdamW and the cosine learning-rate schedule of docs/method.md §6."""
import torch


def build_optimizer(cfg, model, criterion, graphs=False, fused=None):
    """AdamW over every trainable parameter (weight decay on all) and cosine annealing per epoch.

    fused: None picks the fused kernel when every parameter is on CUDA; False runs the plain
    per-parameter loop (the benchmark's baseline). For CUDA-graph replay (`graphs`) the optimizer
    is also capturable and its learning rate a device tensor, which the scheduler updates in
    place between replays.
    """
    t = cfg.train
    params = [p for p in list(model.parameters()) + list(criterion.parameters()) if p.requires_grad]
    if fused is None:
        fused = all(p.is_cuda for p in params)
    lr = torch.tensor(t.lr, device=params[0].device) if graphs else t.lr
    optimizer = torch.optim.AdamW(params, lr=lr, betas=tuple(t.betas), weight_decay=t.weight_decay,
                                  fused=fused or None, foreach=None if fused else False,
                                  capturable=graphs)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=t.num_epochs,
                                                           eta_min=t.min_lr)
    return optimizer, scheduler
