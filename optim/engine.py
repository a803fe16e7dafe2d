"""One training step and one epoch (docs/method.md §6).

Shapes (docs/method.md §2): b videos per batch, M frames, D feature size, v visible and
m = M - v masked frames per view, B bits, K clusters, N training videos.
"""
import math

import torch
from tqdm import tqdm

from inference.encode import autocast
from model.s5vh import gather_frames
from utils.errors import UserError


class NonFiniteLossError(UserError):
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


@torch.no_grad()
def full_view_logits(model, criterion, x, amp=False):
    """Center logits of the real-valued mean code of all M frames, without gradient or DropPath."""
    was_training = model.training
    model.eval()
    with autocast(x.device, amp):
        code = model.frame_codes(x).mean(1)                                   # (b, B)
    model.train(was_training)
    return criterion.center_logits(code.float())


def training_loss(model, criterion, x, index, label_table, smoothing_beta, visible, masked,
                  amp=False, one_pass=True):
    """Loss of one batch: x (b, M, D) features of videos `index` (b,); visible (2b, v) and
    masked (2b, m) from `make_views`. smoothing_beta: beta, or None during warm-up.
    Both views go through the model as one batch of 2b rows (`one_pass=False`: one view after
    the other, as a plain implementation would). With amp the model runs in bf16 autocast; the
    losses are computed in float32. Returns (loss, {'rec', 'con', 'ca'})."""
    both = torch.cat([x, x])
    with autocast(x.device, amp):
        if one_pass:
            outputs = model(both, visible, masked)
        else:
            b = x.shape[0]
            views = [model(x, visible[rows], masked[rows]) for rows in (slice(0, b), slice(b, None))]
            outputs = {key: torch.cat([view[key] for view in views]) for key in views[0]}
    outputs = {key: value.float() for key, value in outputs.items()}
    targets = gather_frames(both, masked).float()                              # (2b, m, D)
    if smoothing_beta is None:
        soft_labels = label_table[index]
    else:
        soft_labels = label_table.update(index, full_view_logits(model, criterion, x, amp),
                                         smoothing_beta)
    return criterion(outputs, targets, soft_labels)


class TrainStep:
    """One optimisation step on a batch: loss, backward, optimizer step.

    With `cuda_graphs`, full batches on CUDA replay a captured graph of the whole step (forward,
    backward, fused AdamW, label-table update), which removes the per-kernel launch cost that
    dominates a model this small; one graph per phase (warm-up, smoothing), captured after a few
    eager steps. Other batches (the last, smaller one) run eagerly with the same parameters.
    """

    EAGER_STEPS_BEFORE_CAPTURE = 3

    def __init__(self, model, criterion, optimizer, features, label_table, batch_size,
                 amp=False, cuda_graphs=False, one_pass=True):
        self.model, self.criterion, self.optimizer = model, criterion, optimizer
        self.features, self.label_table, self.amp = features, label_table, amp
        self.batch_size, self.one_pass = batch_size, one_pass
        self.device = label_table.table.device
        self.use_graphs = cuda_graphs and features.is_cuda
        self.graphs, self.eager_counts = {}, {}

    def _eager(self, index, visible, masked, smoothing_beta):
        # features stay where they are kept (the device, or the host for a plain baseline) and
        # in their stored dtype (bf16 resident features are widened here)
        x = self.features[index.to(self.features.device)].to(self.device).float()
        index, visible, masked = (t.to(self.device) for t in (index, visible, masked))
        loss, parts = training_loss(self.model, self.criterion, x, index, self.label_table,
                                    smoothing_beta, visible, masked, self.amp, self.one_pass)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.detach(), parts

    def __call__(self, index, visible, masked, smoothing_beta):
        """index (b,), visible (2b, v), masked (2b, m); smoothing_beta: beta or None (warm-up).
        Returns (loss, {'rec', 'con', 'ca'}) as device tensors."""
        phase = smoothing_beta is not None
        if not self.use_graphs or len(index) != self.batch_size:
            return self._eager(index, visible, masked, smoothing_beta)
        if phase not in self.graphs:
            count = self.eager_counts.get(phase, 0)
            if count < self.EAGER_STEPS_BEFORE_CAPTURE:
                self.eager_counts[phase] = count + 1
                side = torch.cuda.Stream()          # warm-up steps off the default stream
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    result = self._eager(index, visible, masked, smoothing_beta)
                torch.cuda.current_stream().wait_stream(side)
                return result
            self.graphs[phase] = self._capture(index, visible, masked, smoothing_beta)
        graph, buffers, outputs = self.graphs[phase]
        for buffer, value in zip(buffers, (index, visible, masked)):
            buffer.copy_(value)
        graph.replay()
        return outputs

    def _capture(self, index, visible, masked, smoothing_beta):
        """Capture the step on static copies of the inputs; capturing records, replay runs."""
        buffers = (index.clone(), visible.clone(), masked.clone())
        graph = torch.cuda.CUDAGraph()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.cuda.graph(graph):
            static_index, static_visible, static_masked = buffers
            loss, parts = training_loss(self.model, self.criterion,
                                        self.features[static_index].float(), static_index,
                                        self.label_table, smoothing_beta, static_visible,
                                        static_masked, self.amp, self.one_pass)
            loss.backward()
            self.optimizer.step()
        return graph, buffers, (loss.detach(), parts)


def batch_indices(num_videos, batch_size, generator, device):
    """A random order of range(N) cut into batches (a last batch of one video is dropped: the
    contrastive loss needs a second video)."""
    order = torch.randperm(num_videos, generator=generator, device=device)
    batches = list(order.split(batch_size))
    if len(batches) > 1 and len(batches[-1]) < 2:
        batches.pop()
    return batches


def train_one_epoch(step, epoch, cfg, progress=True):
    """Train over all videos once with `step` (a TrainStep).

    Returns the epoch's averages {'loss', 'rec', 'con', 'ca'} as floats. Losses stay on the
    device between logging intervals; a non-finite loss raises NonFiniteLossError.
    """
    t = cfg.train
    features = step.features
    device = features.device
    generator = epoch_generator(cfg.seed, epoch, device)
    smoothing_beta = None if epoch < t.warm_up_epoch else t.smoothing_beta
    batches = batch_indices(len(features), t.batch_size, generator, device)
    step.model.train()
    sums = torch.zeros(4, device=device)
    bar = tqdm(batches, desc=f"epoch {epoch + 1}/{t.num_epochs}", leave=False,
               disable=not progress, dynamic_ncols=True)
    for count, index in enumerate(bar, start=1):
        visible, masked = make_views(len(index), features.shape[1], t.mask_ratio, generator,
                                     device)
        loss, parts = step(index, visible, masked, smoothing_beta)
        sums += torch.stack([loss, parts["rec"], parts["con"], parts["ca"]])
        if count % t.log_every == 0 or count == len(batches):
            values = (sums / count).tolist()
            if not all(math.isfinite(v) for v in values):
                raise NonFiniteLossError(
                    f"non-finite loss in epoch {epoch + 1} by step {count} (running means "
                    f"loss/rec/con/ca = {values}); lower train.lr or check the features")
            bar.set_postfix(loss=f"{values[0]:.4f}")
    return dict(zip(("loss", "rec", "con", "ca"), (sums / max(len(batches), 1)).tolist()))
