"""OUPN: online unsupervised prototypical networks, "Online Unsupervised Learning of Visual
Representations and Categories" (Ren, Scott, Mozer, Zemel et al., 2021/2022), with its online
prototype memory.

Representation learning from a non-stationary stream without labels: images arrive in class blocks
(``stream="class_blocks"``: the training set ordered class by class, each block shuffled; the
labels order the stream and are used for nothing else), each image is seen once per epoch.

- **prototype memory** (buffers ``prototypes [K,D]``, ``counts [K]``, ``active [K]``): an online
  Gaussian mixture on the unit sphere with shared isotropic variance, ``log p(k | z) =
  log_softmax_k(-||z - p_k||^2 / tau)`` over the active prototypes (:func:`prototype_log_probs`);
- **novelty**: an image whose nearest prototype is farther than ``novelty_threshold`` (squared
  distance) starts a new prototype from its embedding alone; with the memory full the least used
  prototype is replaced (:meth:`OUPN.add_novel`);
- **online update**: after each step ``p_k <- normalise((c_k p_k + sum_i q_ik z_i) / (c_k + sum_i q_ik))``
  and ``c_k <- decay * c_k + sum_i q_ik`` with the view-1 posteriors ``q`` (:meth:`OUPN.update_memory`);
- **loss** (:func:`oupn_loss`): each view's sharpened posterior is the target of the other view's
  (swapped prediction), minus ``entropy_weight`` times the entropy of the batch's mean posterior.
  No Sinkhorn and no equipartition: assignments may be unbalanced.

The online clustering prediction of each image (its most probable prototype when it arrives) is
kept in ``online_pred [N]`` (-1: not seen yet) for the online clustering ACC. Under DDP the memory is
updated with the embeddings of the global batch, gathered in rank order, so every rank holds the same
memory. ``simclr_stream`` is SimCLR trained on the same stream, the comparison of the paper.

Differences from the paper: no separate new-cluster loss or learned novelty threshold; cosine
embeddings with a fixed ``tau``; the memory replaces its least used prototype instead of decaying
counts to deletion.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from train.distributed import all_gather_rows
from train.methods.base import Method, StepContext, register_method
from train.methods.simclr import SimCLR
from zoo.heads import ProjectionHead
from zoo.model import ZooModel


def class_blocked_order(labels: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """``[N]`` stream order: class 0's images, then class 1's, ...; each block in a random order drawn with
    ``torch.Generator().manual_seed(seed * 1009 + c)``."""
    blocks = []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        blocks.append(idx[torch.randperm(idx.numel(), generator=torch.Generator().manual_seed(seed * 1009 + c))])
    return torch.cat(blocks)


def prototype_log_probs(z: torch.Tensor, prototypes: torch.Tensor, active: torch.Tensor, tau: float = 0.1
                        ) -> torch.Tensor:
    """``[B,K]`` ``log softmax_k(-||z_i - p_k||^2 / tau)`` over the active prototypes (-inf for inactive ones)."""
    d = (z.unsqueeze(1) - prototypes.to(z).unsqueeze(0)).pow(2).sum(dim=2)  # [B,K]
    return torch.log_softmax((-d / tau).masked_fill(~active.view(1, -1), float("-inf")), dim=1)


def oupn_loss(log_q1: torch.Tensor, log_q2: torch.Tensor, sharpen: float = 0.5, entropy_weight: float = 1.0
              ) -> torch.Tensor:
    """Swapped prototype prediction with a mean-entropy term.

    Args:
        log_q1, log_q2: ``[B,K]`` log posteriors of the two views (-inf on inactive prototypes).
        sharpen: T of the targets ``t = q^(1/T) / sum q^(1/T)`` (no gradient through them).

    Returns:
        scalar: ``1/2 mean_i [ -sum_k t1_ik log q2_ik - sum_k t2_ik log q1_ik ] - entropy_weight * H(qbar)``
        with ``qbar = mean over both views and the batch of q`` and ``H(p) = -sum_k p_k log p_k``.
    """
    t1 = torch.softmax(log_q1.detach() / sharpen, dim=1)
    t2 = torch.softmax(log_q2.detach() / sharpen, dim=1)
    finite2, finite1 = torch.isfinite(log_q2), torch.isfinite(log_q1)
    ce = -(t1 * log_q2.masked_fill(~finite2, 0)).sum(1) - (t2 * log_q1.masked_fill(~finite1, 0)).sum(1)
    qbar = torch.cat([log_q1.exp(), log_q2.exp()]).mean(dim=0)
    entropy = -(qbar * qbar.clamp_min(1e-12).log()).sum()
    return 0.5 * ce.mean() - entropy_weight * entropy


class StreamOrder:
    """Mixin: the epoch's order is the class-blocked stream (buffer ``stream_order``, built at step 0)."""

    stream: str | None = "class_blocks"

    def init_stream(self, ctx: StepContext) -> None:
        if self.stream is None or (ctx.step > 0 and self.stream_order.numel() == ctx.dataset_size):
            return
        if ctx.labels is None:
            raise ValueError("the class-blocked stream is ordered by the labels; the dataset has none "
                             "(set stream: null for an ordinary shuffled run)")
        self.stream_order = class_blocked_order(ctx.labels(torch.arange(ctx.dataset_size)).cpu(), ctx.seed).to(
            self.stream_order.device)

    def sample_order(self, epoch: int, seed: int, n: int) -> torch.Tensor | None:
        return self.stream_order.cpu() if self.stream is not None and self.stream_order.numel() == n else None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # buffers sized by the checkpoint
        for name in ("stream_order", "online_pred"):
            if prefix + name in state_dict and hasattr(self, name):
                setattr(self, name, torch.empty_like(state_dict[prefix + name]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


@register_method("oupn")
class OUPN(StreamOrder, Method):
    """Encoder + projection MLP + online prototype memory (see the module docstring)."""

    def __init__(self, model: ZooModel, proj_hidden_dim: int = 512, proj_dim: int = 128, max_prototypes: int = 100,
                 tau: float = 0.1, novelty_threshold: float = 1.0, sharpen: float = 0.5, entropy_weight: float = 1.0,
                 count_decay: float = 0.99, stream: str | None = "class_blocks"):
        super().__init__(model)
        if stream not in (None, "class_blocks"):
            raise ValueError(f"stream must be 'class_blocks' or null, got {stream!r}")
        if max_prototypes < 1 or tau <= 0 or not 0 < sharpen <= 1:
            raise ValueError(f"need max_prototypes >= 1 ({max_prototypes}), tau > 0 ({tau}), 0 < sharpen <= 1 ({sharpen})")
        self.projector = ProjectionHead(model.num_features, proj_hidden_dim, proj_dim, num_layers=2)
        self.tau, self.novelty_threshold, self.sharpen = tau, novelty_threshold, sharpen
        self.entropy_weight, self.count_decay, self.stream = entropy_weight, count_decay, stream
        self.register_buffer("prototypes", torch.zeros(max_prototypes, proj_dim))
        self.register_buffer("counts", torch.zeros(max_prototypes))
        self.register_buffer("active", torch.zeros(max_prototypes, dtype=torch.bool))
        self.register_buffer("stream_order", torch.zeros(0, dtype=torch.long))
        self.register_buffer("online_pred", torch.zeros(0, dtype=torch.long))

    def on_train_start(self, ctx: StepContext) -> None:
        self.init_stream(ctx)
        if self.online_pred.numel() != ctx.dataset_size:
            self.online_pred = torch.full((ctx.dataset_size,), -1, dtype=torch.long, device=self.prototypes.device)

    @torch.no_grad()
    def add_novel(self, z: torch.Tensor) -> int:
        """Rows of ``z [M,D]`` (normalised), in order, whose nearest active prototype is farther than the
        threshold each become a prototype (one example); the least used slot is reused when full. Returns
        how many were added."""
        added = 0
        for row in z:
            if bool(self.active.any()):
                d = (self.prototypes[self.active] - row).pow(2).sum(dim=1).min()
                if float(d) <= self.novelty_threshold:
                    continue
            free = torch.nonzero(~self.active).flatten()
            slot = int(free[0]) if free.numel() else int(self.counts.argmin())
            self.prototypes[slot], self.counts[slot], self.active[slot] = row, 1.0, True
            added += 1
        return added

    @torch.no_grad()
    def update_memory(self, z: torch.Tensor, q: torch.Tensor) -> None:
        """Online mixture update with embeddings ``z [M,D]`` and their posteriors ``q [M,K]``."""
        mass = q.sum(dim=0)  # [K]
        num = self.counts.view(-1, 1) * self.prototypes + q.T @ z
        new = F.normalize(num / (self.counts + mass).clamp_min(1e-12).view(-1, 1), dim=1)
        self.prototypes.copy_(torch.where(self.active.view(-1, 1), new, self.prototypes))
        self.counts.copy_(torch.where(self.active, self.count_decay * self.counts + mass, self.counts))

    def training_step(self, images: torch.Tensor, indices: torch.Tensor, ctx: StepContext) -> dict[str, torch.Tensor]:
        v1, v2 = ctx.augment.views(images, ctx.generator, 2)
        z = F.normalize(self.projector(self.model.forward_features(torch.cat([v1, v2]))), dim=1)
        z1, z2 = z.chunk(2)
        if self.training:  # novelty over the global batch, in rank order: the same memory on every rank
            everyone = all_gather_rows(z1.detach())
            self.add_novel(everyone)
        log_q1 = prototype_log_probs(z1, self.prototypes, self.active, self.tau)
        log_q2 = prototype_log_probs(z2, self.prototypes, self.active, self.tau)
        loss = oupn_loss(log_q1, log_q2, self.sharpen, self.entropy_weight)
        if self.training:
            q_all = prototype_log_probs(everyone, self.prototypes, self.active, self.tau).exp()
            idx = all_gather_rows(indices.to(q_all.device)).to(self.online_pred.device)
            self.online_pred[idx] = q_all.argmax(dim=1).to(self.online_pred)  # the cluster on arrival
            self.update_memory(everyone, q_all)
        return {"loss": loss, "prototypes": self.active.sum().float()}


@register_method("simclr_stream")
class StreamSimCLR(StreamOrder, SimCLR):
    """SimCLR trained on OUPN's class-blocked stream (``stream: null`` gives plain SimCLR)."""

    def __init__(self, model: ZooModel, proj_hidden_dim: int = 512, proj_dim: int = 128, proj_layers: int = 2,
                 temperature: float = 0.5, stream: str | None = "class_blocks"):
        super().__init__(model, proj_hidden_dim, proj_dim, proj_layers, temperature)
        self.stream = stream
        self.register_buffer("stream_order", torch.zeros(0, dtype=torch.long))

    def on_train_start(self, ctx: StepContext) -> None:
        self.init_stream(ctx)
