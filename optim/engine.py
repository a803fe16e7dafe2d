"""One training step and one epoch (docs/method.md §6).

`train_step` is the eager step and `train_one_epoch` the epoch loop. Everything random in an
epoch (batch order, the two views' masks, DropPath) is drawn from one generator seeded by
(seed, epoch), so a step is a function of its inputs: a resumed run draws exactly what an
uninterrupted one draws, and runs that share a GPU do not disturb each other. `TrainStep` is a
thin wrapper that replays `train_step` as a captured CUDA graph; the epoch loop yields after each
step so that several runs can take turns (optim.runner).

Shapes (docs/method.md §2): b videos per batch, M frames, D feature size, v visible and
m = M - v masked frames per view, B bits, K clusters, N training videos.
"""
import math
from dataclasses import dataclass

import torch

from inference.encode import autocast
from model.s5vh import gather_frames
from optim.distributed import gather_rows


def epoch_generator(seed, epoch, device):
    """The generator of an epoch's batch order, masks and DropPath noise: a function of
    (seed, epoch) only."""
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


@dataclass
class StepInputs:
    """What one step draws: videos `index` (b,), views visible (2b, v) and masked (2b, m), and
    DropPath noise (depth, 2b) uniform in [0, 1)."""
    index: torch.Tensor
    visible: torch.Tensor
    masked: torch.Tensor
    path_noise: torch.Tensor

    def rows(self, part):
        """The inputs of the videos `part` (a slice of the b): their rows in both views."""
        b = len(self.index)
        views = torch.cat([torch.arange(b)[part], b + torch.arange(b)[part]]).to(
            self.visible.device)
        return StepInputs(self.index[part], self.visible[views], self.masked[views],
                          self.path_noise[:, views])


def draw_step_inputs(index, frames, mask_ratio, depth, generator):
    """The random inputs of the step on the videos `index`, from the epoch's generator."""
    device = index.device
    visible, masked = make_views(len(index), frames, mask_ratio, generator, device)
    noise = torch.rand(depth, 2 * len(index), generator=generator, device=device)
    return StepInputs(index, visible, masked, noise)


@torch.no_grad()
def full_view_logits(model, criterion, x, amp=False):
    """Center logits of the real-valued mean code of all M frames, without gradient or DropPath."""
    was_training = model.training
    model.eval()
    with autocast(x.device, amp):
        code = model.frame_codes(x).mean(1)                                   # (b, B)
    model.train(was_training)
    return criterion.center_logits(code.float())


def training_loss(model, criterion, x, inputs, label_table, smoothing_beta, amp=False,
                  shard=None, count=None):
    """Loss of one batch: x (b, M, D) features of the videos `inputs.index`. smoothing_beta:
    beta, or None during warm-up. Both views go through the model as one batch of 2b rows; with
    amp the model runs in bf16 autocast and the losses in float32. With `shard` (several
    processes, optim.distributed) these are this process's rows of a global batch of `count`
    videos, and `model` is the DistributedDataParallel wrapper.
    Returns (loss, {'rec', 'con', 'ca'})."""
    bare = getattr(model, "module", model)
    both = torch.cat([x, x])
    with autocast(x.device, amp):
        outputs = model(both, inputs.visible, inputs.masked, inputs.path_noise)
    outputs = {key: value.float() for key, value in outputs.items()}
    targets = gather_frames(both, inputs.masked).float()                      # (2b, m, D)
    if smoothing_beta is None:
        soft_labels = label_table[inputs.index]
    else:
        soft_labels = label_table.update(inputs.index,
                                         full_view_logits(bare, criterion, x, amp),
                                         smoothing_beta)
    if shard is None:
        return criterion(outputs, targets, soft_labels)
    sizes = shard.sizes(count)
    if smoothing_beta is not None:        # every process's table takes every process's rows
        label_table.table[gather_rows(inputs.index, sizes)] = gather_rows(soft_labels, sizes)
    return criterion(outputs, targets, soft_labels, lambda rows: gather_rows(rows, sizes),
                     shard.weight(count))


def train_step(model, criterion, optimizer, x, inputs, label_table, smoothing_beta, amp=False,
               shard=None, count=None):
    """One optimisation step on a batch: loss, backward, AdamW step. Returns (loss, parts) as
    device tensors."""
    loss, parts = training_loss(model, criterion, x, inputs, label_table, smoothing_beta, amp,
                                shard, count)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach(), parts


class TrainStep:
    """`train_step` of one run: its model, optimizer, label table and device-resident features
    (N, M, D), in any float dtype (bf16 ones are widened per batch).

    With `cuda_graphs`, every step on CUDA replays a captured graph of the whole step (forward,
    backward, fused AdamW, label-table update), which removes the per-kernel launch cost that
    dominates a model this small: one graph per phase (warm-up, smoothing) and batch size (the
    full batches and the epoch's last, smaller one), all captured by `capture_graphs` before the
    first step. Graphs of one batch size share a memory pool (their phases never overlap); the
    last batch's graphs have a pool of their own, since they replay between the full ones and
    their temporaries must not land on memory the others hold. Everything runs on the current
    stream, which must not be the default stream when graphs are used (the runner gives each run
    its own): the eager steps before a capture are then on a side stream, as CUDA graphs
    require, and no tensor of a step is ever used on another stream than the one it was made on.
    """

    # one sets everything up; more only cost start-up time (each is an eager step)
    EAGER_STEPS_BEFORE_CAPTURE = 1

    def __init__(self, model, criterion, optimizer, features, label_table, batch_size,
                 amp=False, cuda_graphs=False, shard=None, train_model=None):
        self.model, self.criterion, self.optimizer = model, criterion, optimizer
        # the DDP wrapper with a shard, the compiled model with train.compile (a compiled
        # module has no truth value: test for None)
        self.train_model = model if train_model is None else train_model
        self.features, self.label_table, self.amp = features, label_table, amp
        self.batch_size, self.shard = batch_size, shard
        self.use_graphs = cuda_graphs and features.is_cuda and shard is None
        self.graphs, self.pools = {}, {}

    def _eager(self, inputs, smoothing_beta, count=None):
        x = self.features[inputs.index].float()
        return train_step(self.train_model, self.criterion, self.optimizer, x, inputs,
                          self.label_table, smoothing_beta, self.amp, self.shard, count)

    def __call__(self, inputs, smoothing_beta, count=None):
        """One step on `inputs` (StepInputs; with a shard, this process's rows of a global
        batch of `count` videos); smoothing_beta: beta or None (warm-up).
        Returns (loss, {'rec', 'con', 'ca'}) as device tensors."""
        if not self.use_graphs:
            return self._eager(inputs, smoothing_beta, count)
        key = (smoothing_beta is not None, len(inputs.index))          # (phase, batch size)
        if key not in self.graphs:
            raise RuntimeError(f"no CUDA graph was captured for the step {key} (phase, batch "
                               f"size); capture_graphs takes an example of every step")
        graph, static, outputs = self.graphs[key]
        for name in ("index", "visible", "masked", "path_noise"):
            getattr(static, name).copy_(getattr(inputs, name))
        graph.replay()
        return outputs

    def capture_graphs(self, examples):
        """Capture the graph of each step in `examples`, [(StepInputs, smoothing_beta)], one per
        (phase, batch size), before training. An eager step of each comes first (cuBLAS, the
        Triton kernels and the optimizer's state are set up lazily, and not during a capture);
        then every tensor a step changes is put back as it was, so that those steps leave no
        trace. Every step of the run is then a replay, and a resumed run replays exactly what an
        uninterrupted one did (an eager step can differ from its replay in the last bits).

        A generator: it yields after each eager step and each capture, so that other runs on the
        GPU can step in between (exhaust it to capture everything at once)."""
        if torch.cuda.current_stream() == torch.cuda.default_stream():
            raise RuntimeError("TrainStep with CUDA graphs runs on a stream of its own (the "
                               "eager steps before a capture must not be on the default one)")
        before = {id(t): (t, t.detach().clone()) for t in self._state_tensors()}
        for inputs, smoothing_beta in examples:
            for _ in range(self.EAGER_STEPS_BEFORE_CAPTURE):
                self._eager(inputs, smoothing_beta)
                yield
        with torch.no_grad():
            for t in self._state_tensors():
                if id(t) in before:
                    t.copy_(before[id(t)][1])
                else:               # optimizer state the eager steps made: zeros, as torch does
                    t.zero_()
        for inputs, smoothing_beta in examples:
            key = (smoothing_beta is not None, len(inputs.index))
            self.graphs[key] = self._capture(inputs, smoothing_beta)
            yield
        # the eager steps' memory stays cached for this run's stream alone, which no longer
        # allocates: give it back to the other runs
        torch.cuda.empty_cache()

    def _state_tensors(self):
        """Every tensor a step changes: weights and buffers, the optimizer's state (the step
        count and moments), the label table."""
        tensors = [*self.model.state_dict(keep_vars=True).values(),
                   *self.criterion.state_dict(keep_vars=True).values(), self.label_table.table]
        for state in self.optimizer.state.values():
            tensors += [value for value in state.values() if torch.is_tensor(value)]
        return tensors

    def _capture(self, inputs, smoothing_beta):
        """Capture the step on static copies of the inputs; capturing records, replay runs."""
        static = StepInputs(*(t.clone() for t in (inputs.index, inputs.visible, inputs.masked,
                                                   inputs.path_noise)))
        graph = torch.cuda.CUDAGraph()
        self.optimizer.zero_grad(set_to_none=True)
        # captured on the run's own stream (the current one): a capture stream taken from torch's
        # pool of streams can be another run's stream, and the cuBLAS workspace made for it
        # during the capture (kept per stream, in this graph's memory) would then be shared by
        # two runs at once. capture_begin/end, not the torch.cuda.graph context, which first
        # synchronises the whole device: the other runs' steps stay on the GPU meanwhile.
        size = len(inputs.index)
        graph.capture_begin(pool=self.pools.get(size))
        try:
            outputs = self._eager(static, smoothing_beta)
        finally:
            graph.capture_end()
        self.pools[size] = graph.pool()
        return graph, static, outputs


def step_examples(cfg, num_videos, depth, device, start_epoch=0):
    """An example of every kind of step that epochs start_epoch.. of `cfg` take, for
    TrainStep.capture_graphs: [(StepInputs, smoothing_beta)] for each phase still ahead
    (warm-up, smoothing) and each batch size of an epoch (batch_indices decides them)."""
    t = cfg.train
    generator = torch.Generator(device=device).manual_seed(0)
    sizes = sorted({len(b) for b in batch_indices(num_videos, t.batch_size, generator, device)},
                   reverse=True)
    phases = []
    if start_epoch < min(t.warm_up_epoch, t.num_epochs):
        phases.append(None)
    if max(start_epoch, t.warm_up_epoch) < t.num_epochs:
        phases.append(t.smoothing_beta)
    return [(draw_step_inputs(torch.arange(size, device=device), cfg.max_frames, t.mask_ratio,
                              depth, generator), beta) for beta in phases for size in sizes]


def batch_indices(num_videos, batch_size, generator, device):
    """A random order of range(N) cut into batches (a last batch of one video is dropped: the
    contrastive loss needs a second video)."""
    order = torch.randperm(num_videos, generator=generator, device=device)
    batches = list(order.split(batch_size))
    if len(batches) > 1 and len(batches[-1]) < 2:
        batches.pop()
    return batches


def train_one_epoch(step, epoch, cfg):
    """Train over all N training videos once with `step` (a TrainStep).

    A generator: it yields after every step, so that runs sharing a GPU can take turns, and
    returns the epoch's mean losses (loss, rec, con, ca) as a (4,) device tensor (reading them
    would wait for the GPU, which the caller does when it needs the numbers). With several
    processes every one draws the whole global batch and trains on its rows."""
    t = cfg.train
    device = step.features.device
    generator = epoch_generator(cfg.seed, epoch, device)
    smoothing_beta = None if epoch < t.warm_up_epoch else t.smoothing_beta
    batches = batch_indices(len(step.features), t.batch_size, generator, device)
    step.model.train()
    sums = torch.zeros(4, device=device)
    for index in batches:
        inputs = draw_step_inputs(index, cfg.max_frames, t.mask_ratio, step.model.depth,
                                  generator)
        if step.shard is not None:
            inputs = inputs.rows(step.shard.rows(len(index)))
        loss, parts = step(inputs, smoothing_beta, len(index))
        sums += torch.stack([loss, parts["rec"], parts["con"], parts["ca"]])
        yield
    return sums / len(batches)
