"""One training step, one epoch, and encoding: the functions train.py and the tests call.

Shapes: b videos per batch, M frames, D feature size, v visible and m = M - v masked frames per
view, B bits, K clusters, N videos in a set.
"""
import math

import torch
from tqdm import tqdm

from dataset.io import FeatureFile, check_finite
from model.s5vh import gather_frames


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or Inf."""


def epoch_generator(seed, epoch, device):
    """The generator of an epoch's batch order and masks: a function of (seed, epoch) only, so a
    run resumed at an epoch boundary draws exactly what an uninterrupted run draws."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + epoch)


def make_views(batch, frames, mask_ratio, generator, device):
    """Two masked views per video from one random permutation of its frames.

    With v = M - floor(r M): view 1 sees the first v permuted frames, view 2 the last v; each
    view masks the rest. Returns visible (2b, v) and masked (2b, m) frame indices, sorted in time,
    view 1 in rows 0..b-1 and view 2 in rows b..2b-1.
    """
    visible_count = frames - int(math.floor(mask_ratio * frames))
    perm = torch.rand(batch, frames, generator=generator, device=device).argsort(1)
    visible = torch.cat([perm[:, :visible_count], perm[:, frames - visible_count:]])
    masked = torch.cat([perm[:, visible_count:], perm[:, :frames - visible_count]])
    return visible.sort(1).values, masked.sort(1).values


def autocast(device, enabled):
    """bf16 autocast on CUDA when enabled; a no-op context otherwise."""
    return torch.autocast(device_type="cuda", dtype=torch.bfloat16,
                          enabled=enabled and torch.device(device).type == "cuda")


@torch.no_grad()
def full_view_logits(model, criterion, x, amp=False):
    """Center logits of the real-valued mean code of all M frames, without gradient or DropPath."""
    was_training = model.training
    model.eval()
    with autocast(x.device, amp):
        code = model.frame_codes(x).mean(1)                                   # (b, B)
    model.train(was_training)
    return criterion.center_logits(code.float())


def training_step(model, criterion, x, index, label_table, smoothing, generator, mask_ratio,
                  amp=False):
    """Loss of one batch: x (b, M, D) features of videos `index` (b,). Both views go through
    the model in one pass of 2b rows. smoothing: beta, or None during warm-up. With amp the
    model runs in bf16 autocast; the losses are computed in float32."""
    b, frames = x.shape[:2]
    visible, masked = make_views(b, frames, mask_ratio, generator, x.device)
    both = torch.cat([x, x])
    with autocast(x.device, amp):
        outputs = model(both, visible, masked)
    outputs = {key: value.float() for key, value in outputs.items()}
    targets = gather_frames(both, masked).float()                              # (2b, m, D)
    if smoothing is None:
        soft_labels = label_table[index]
    else:
        soft_labels = label_table.update(index, full_view_logits(model, criterion, x, amp),
                                         smoothing)
    return criterion(outputs, targets, soft_labels)


def batch_indices(num_videos, batch_size, generator, device):
    """A random order of range(N) cut into batches (a last batch of one video is dropped: the
    contrastive loss needs a second video)."""
    order = torch.randperm(num_videos, generator=generator, device=device)
    batches = list(order.split(batch_size))
    if len(batches) > 1 and len(batches[-1]) < 2:
        batches.pop()
    return batches


def train_one_epoch(model, criterion, optimizer, features, label_table, epoch, cfg,
                    progress=True):
    """Train over all videos once. features: (N, M, D) tensor on the training device.

    Returns the epoch's averages {'loss', 'rec', 'con', 'ca'} as floats. Losses stay on the
    device between logging intervals; a non-finite loss raises NonFiniteLossError.
    """
    t = cfg.train
    device = features.device
    generator = epoch_generator(cfg.seed, epoch, device)
    smoothing = None if epoch < t.warm_up_epoch else t.smoothing_alpha
    batches = batch_indices(len(features), t.batch_size, generator, device)
    model.train()
    sums = torch.zeros(4, device=device)
    bar = tqdm(batches, desc=f"epoch {epoch + 1}/{t.num_epochs}", leave=False,
               disable=not progress, dynamic_ncols=True)
    for step, index in enumerate(bar, start=1):
        loss, parts = training_step(model, criterion, features[index], index, label_table,
                                    smoothing, generator, t.mask_ratio, t.amp)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        sums += torch.stack([loss.detach(), parts["rec"], parts["con"], parts["ca"]])
        if step % t.log_every == 0 or step == len(batches):
            values = (sums / step).tolist()
            if not all(math.isfinite(v) for v in values):
                raise NonFiniteLossError(
                    f"non-finite loss in epoch {epoch + 1} by step {step} (running means "
                    f"loss/rec/con/ca = {values}); lower train.lr or check the features")
            bar.set_postfix(loss=f"{values[0]:.4f}")
    return dict(zip(("loss", "rec", "con", "ca"), (sums / max(len(batches), 1)).tolist()))


@torch.no_grad()
def encode_tensor(model, features, batch_size, device, amp=False):
    """(N, M, D) features (any device) -> (N, B) ±1 codes on `device`."""
    model.eval()
    with autocast(device, amp):
        codes = [model.encode(features[i:i + batch_size].to(device).float())
                 for i in range(0, len(features), batch_size)]
    return torch.cat(codes).float()


@torch.no_grad()
def encode_videos(model, videos, cfg, device):
    """Codes (n, B) of a VideoSet, read from its file `eval.batch_size` videos at a time."""
    model.eval()
    codes = []
    with FeatureFile(videos.path, videos.key, cfg.max_frames, cfg.feature_size) as feats:
        for idx, block in feats.iter_chunks(cfg.eval.batch_size, videos.rows):
            check_finite(block, videos.path, videos.key, offset=int(idx[0]))
            codes.append(model.encode(torch.from_numpy(block).to(device)))
    return torch.cat(codes)
