"""S5VH training signals (docs/method.md §6): self (masked reconstruction), local (debiased
contrastive), global (center alignment with soft pseudo-labels), and the label table they share.

Shapes (docs/method.md §2): b videos per batch, B bits, K clusters, m masked frames, D feature
size, N training videos.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def reconstruction_loss(prediction, target):
    """Mean squared error over the masked frames' features of one view: (b, m, D) each."""
    return F.mse_loss(prediction, target)


def debiased_contrastive_loss(z1, z2, temperature, tau_plus, clusters=None):
    """Debiased contrastive loss (Chuang et al., 2020) between two views' codes, (b, B) each.

    For each of the 2b anchors, the positive is the other view of the same video and the 2b - 2
    remaining codes are negatives; the negative term is debiased and clamped from below:
    Ng = max((neg - tau_plus * N * pos) / (1 - tau_plus), N * e^{-1/t}), N = 2b - 2.
    With `clusters` (b,) pseudo-labels (train.negatives='other_clusters'), the codes of videos
    of the anchor's own cluster are left out of its negatives too, and N counts the rest.
    """
    b = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=1)                                   # (2b, B)
    sim = torch.exp(z @ z.T / temperature)                                        # (2b, 2b)
    pos = torch.exp((z[:b] * z[b:]).sum(1) / temperature).repeat(2)              # (2b,)
    excluded = torch.eye(2 * b, dtype=torch.bool, device=z.device)
    excluded = excluded | excluded.roll(b, dims=1)                        # self and partner
    if clusters is not None:
        both = clusters.repeat(2)
        excluded = excluded | (both[:, None] == both[None, :])
    neg = sim.masked_fill(excluded, 0.0).sum(1)
    count = (~excluded).sum(1).to(sim.dtype)                                      # (2b,)
    ng = (neg - tau_plus * count * pos) / (1 - tau_plus)
    ng = torch.maximum(ng, count * math.exp(-1 / temperature))
    return -torch.log(pos / (pos + ng)).mean()


def soft_cross_entropy(logits, targets):
    """Cross-entropy against soft targets: mean over rows of -sum_k y_k log softmax(logits)_k."""
    return -(targets * F.log_softmax(logits, dim=1)).sum(1).mean()


class CenterLogits(nn.Module):
    """Logits of a video code against the K clusters, logits_k = <b, c_k> / (B * tau_c).

    Default (the paper): c_k are the fixed hash centers. trainable=True (the authors' release,
    docs/method.md §9.1): c_k are the rows of a randomly initialised (PyTorch's default), trainable,
    bias-free Linear(B -> K), with the same 1 / (B * tau_c) scaling.
    """

    def __init__(self, centers, temperature, trainable=False):
        super().__init__()
        num_clusters, nbits = centers.shape
        self.scale = 1.0 / (nbits * temperature)
        self.register_buffer("centers", torch.as_tensor(centers, dtype=torch.float32))
        self.classifier = nn.Linear(nbits, num_clusters, bias=False) if trainable else None

    def forward(self, code):
        """code: (b, B) -> (b, K)."""
        if self.classifier is not None:
            return self.classifier(code) * self.scale
        return code @ self.centers.T * self.scale


class S5VHLoss(nn.Module):
    """L = a_r * sum_views L_rec + alpha * L_con + a_c * mean_views L_CA (a_r = 1 but in the
    ablation without reconstruction)."""

    def __init__(self, centers, train_cfg):
        super().__init__()
        self.center_logits = CenterLogits(centers, train_cfg["temperature_cluster"],
                                          train_cfg["trainable_centers"])
        self.a_rec = train_cfg["a_rec"]
        self.alpha, self.a_cluster = train_cfg["alpha"], train_cfg["a_cluster"]
        self.temperature, self.tau_plus = train_cfg["temperature"], train_cfg["tau_plus"]
        self.other_cluster_negatives = train_cfg["negatives"] == "other_clusters"

    def forward(self, outputs, targets, soft_labels, gather=None, weight=1.0):
        """outputs: the model's dict for 2b rows (view 1, then view 2); targets: (2b, m, D) masked
        features; soft_labels: (b, K). Returns (total, {'rec', 'con', 'ca'}).

        With several processes (optim.distributed) these are one process's rows: `gather`
        gives every process's rows (the contrastive loss sees the negatives of the whole
        batch) and `weight` scales the row-averaged losses by this process's share."""
        b = soft_labels.shape[0]
        pred, code = outputs["reconstruction"], outputs["video_code"]
        rec = weight * (reconstruction_loss(pred[:b], targets[:b])
                        + reconstruction_loss(pred[b:], targets[b:]))
        # the pseudo-label of a video: the argmax of its (soft) label row
        clusters = soft_labels.argmax(1) if self.other_cluster_negatives else None
        views = (code[:b], code[b:])
        if gather is not None:
            views = tuple(map(gather, views))
            clusters = None if clusters is None else gather(clusters)
        con = debiased_contrastive_loss(*views, self.temperature, self.tau_plus, clusters)
        logits = self.center_logits(code)
        ca = weight * 0.5 * (soft_cross_entropy(logits[:b], soft_labels)
                             + soft_cross_entropy(logits[b:], soft_labels))
        total = self.a_rec * rec + self.alpha * con + self.a_cluster * ca
        return total, {"rec": rec.detach(), "con": con.detach(), "ca": ca.detach()}


class LabelTable:
    """Soft pseudo-labels y_i (N, K), training state owned by the trainer (not the dataset).

    Starts one-hot from the k-means labels. After warm-up, each time video i is in a batch,
    y_i <- (1 - beta) y_i + beta softmax(logits of its full-view code); the updated y_i is that
    step's target. Updates happen in the training process, so any number of loader workers is fine.
    """

    def __init__(self, pseudo_labels, num_clusters, device="cpu"):
        self.kmeans = torch.as_tensor(pseudo_labels, dtype=torch.long, device=device)   # (N,)
        self.table = F.one_hot(self.kmeans, num_clusters).float()

    def drift(self):
        """How far the table has moved from the k-means labels, as a (2,) device tensor: the
        share of videos whose argmax is no longer their k-means cluster, and the mean entropy
        (nats) of the rows (0 while they are one-hot)."""
        changed = (self.table.argmax(1) != self.kmeans).float().mean()
        entropy = -(self.table * self.table.clamp(min=1e-12).log()).sum(1).mean()
        return torch.stack([changed, entropy])

    def update(self, index, full_view_logits, beta):
        """index: (b,) video ids; full_view_logits: (b, K); beta: the smoothing rate.
        Returns the updated rows (b, K)."""
        rows = (1 - beta) * self.table[index] + beta * full_view_logits.softmax(1)
        self.table[index] = rows
        return rows

    def __getitem__(self, index):
        return self.table[index]

    def state_dict(self):
        return {"table": self.table.cpu()}

    def load_state_dict(self, state):
        if state["table"].shape != self.table.shape:
            raise ValueError(f"label table of shape {tuple(state['table'].shape)} does not fit "
                             f"{tuple(self.table.shape)}")
        self.table = state["table"].to(self.table.device)
