"""SwAV: Unsupervised Learning of Visual Features by Contrasting Cluster Assignments (Caron et al., NeurIPS 2020).

Each image gives 2 large crops and some small crops (multi-crop). Every crop is embedded
(encoder -> projection MLP -> L2 normalisation) and scored against ``K`` unit-norm prototypes.
The two large crops get soft codes by Sinkhorn-Knopp equal partition of their (detached) scores,
optionally over a queue of past large-crop embeddings too; every other crop is trained to
predict those codes from its own scores ("swapped prediction").

Under DDP (as the official ``distributed_sinkhorn``) the equal partition is over the global batch:
``train.sinkhorn`` all-reduces its column sums and sample count, so each rank gets the codes of its own
rows of the global problem. ``queue_length`` is the global queue: each rank keeps ``queue_length / W``
of its own past embeddings, and the ranks' queues together join the partition.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from train.distributed import get_world_size
from train.methods.base import Method, StepContext, register_method
from train.sinkhorn import sinkhorn_knopp
from zoo.heads import ProjectionHead, PrototypeHead
from zoo.model import ZooModel


def swapped_prediction_loss(
    scores: list[torch.Tensor], codes: list[torch.Tensor], temperature: float = 0.1
) -> torch.Tensor:
    """SwAV's swapped prediction loss (Caron et al. 2020, eq. 1-2 with multi-crop, Sec. 3.2).

    Args:
        scores: ``V`` tensors ``[B,K]``, prototype scores ``z_v^T c_k`` of crop ``v``.
        codes: ``A <= V`` tensors ``[B,K]``, codes ``q_i`` of crops ``0..A-1`` (rows sum to 1).
        temperature: tau in the softmax ``p_v = softmax(scores_v / tau)``.

    Returns:
        scalar ``1/A sum_{i<A} 1/(V-1) sum_{v != i} 1/B sum_b -sum_k q_i[b,k] log p_v[b,k]``:
        each coded crop's code is predicted by every other crop. With uniform scores the
        loss is ``log K`` whatever the codes.
    """
    if len(codes) > len(scores) or len(scores) < 2:
        raise ValueError(f"need at least 2 crops and no more codes than crops, got {len(scores)}, {len(codes)}")
    log_p = [F.log_softmax(s / temperature, dim=1) for s in scores]
    total = scores[0].new_zeros(())
    for i, q in enumerate(codes):
        sub = [-(q * log_p[v]).sum(dim=1).mean() for v in range(len(scores)) if v != i]
        total = total + torch.stack(sub).mean()
    return total / len(codes)


@register_method("swav")
class SwAV(Method):
    """Encoder + projection MLP + prototypes trained by swapped prediction of Sinkhorn codes."""

    n_large = 2  # crops that get codes ("crops_for_assign" in the official code)

    def __init__(
        self, model: ZooModel, num_prototypes: int = 30, proj_hidden_dim: int = 512, proj_dim: int = 128,
        temperature: float = 0.1, epsilon: float = 0.05, sinkhorn_iters: int = 3, n_small_crops: int = 2,
        small_size: int | None = None, queue_length: int = 0, queue_start_step: int = 0,
        freeze_prototypes_steps: int = 0, crop_batching: str = "auto",
    ):
        super().__init__(model)
        if crop_batching not in ("auto", "resolution", "crop"):
            raise ValueError(f"crop_batching must be 'auto', 'resolution' or 'crop', got {crop_batching!r}")
        # "resolution": one encoder pass per crop size, as the official code (BatchNorm over all crops
        # of a size; fewer, larger kernels: the GPU's choice). "crop": one pass per crop, as lightly's
        # example (BatchNorm per crop); on CPUs the smaller tensors stay in cache and the step is about
        # 15 % faster (docs/benchmarks.md). "auto": "resolution" on CUDA, "crop" elsewhere.
        self.crop_batching = crop_batching
        self.projector = ProjectionHead(model.num_features, proj_hidden_dim, proj_dim)
        self.prototypes = PrototypeHead(proj_dim, num_prototypes)
        self.prototypes.normalize_()
        self.temperature = temperature
        self.epsilon = epsilon
        self.sinkhorn_iters = sinkhorn_iters
        self.n_small_crops = n_small_crops
        self.small_size = small_size
        self.queue_start_step = queue_start_step
        self.freeze_prototypes_steps = freeze_prototypes_steps
        # Past large-crop embeddings, newest first: queue[i] holds crop i's (SwAV keeps one per crop).
        local_queue = queue_length // get_world_size()  # this rank's share of the global queue
        self.register_buffer("queue", torch.zeros(self.n_large, local_queue, proj_dim))
        self.register_buffer("queue_count", torch.zeros((), dtype=torch.long))  # valid rows
        self._pending: torch.Tensor | None = None  # this step's large-crop embeddings [2,B,D]

    def embed_crops(self, crops: list[torch.Tensor]) -> torch.Tensor:
        """``V`` crops ``[B,3,h_v,w_v]`` -> L2-normalised projections ``[V*B,D]``; one pass per size (or crop)."""
        batching = self.crop_batching
        if batching == "auto":
            batching = "resolution" if crops[0].is_cuda else "crop"
        if batching == "crop":
            return torch.cat([F.normalize(self.projector(self.model.forward_features(c)), dim=1) for c in crops])
        feats, start = [], 0
        while start < len(crops):
            end = start + 1
            while end < len(crops) and crops[end].shape[-2:] == crops[start].shape[-2:]:
                end += 1
            feats.append(self.model.forward_features(torch.cat(crops[start:end])))
            start = end
        return F.normalize(self.projector(torch.cat(feats)), dim=1)

    @property
    def queue_full(self) -> bool:
        return self.queue.shape[1] > 0 and int(self.queue_count) >= self.queue.shape[1]

    @torch.no_grad()
    def compute_codes(self, scores: list[torch.Tensor]) -> list[torch.Tensor]:
        """Sinkhorn codes ``[B,K]`` of the large crops; a full queue joins the partition (SwAV Sec. 4)."""
        codes = []
        for i in range(self.n_large):
            s = scores[i].detach()
            if self.queue_full:
                s = torch.cat([self.prototypes(self.queue[i]), s])
            q = sinkhorn_knopp(s, self.epsilon, self.sinkhorn_iters)
            codes.append(q[-scores[i].shape[0]:])
        return codes

    def training_step(self, images: torch.Tensor, indices: torch.Tensor, ctx: StepContext) -> dict[str, torch.Tensor]:
        b = images.shape[0]
        crops = ctx.augment.multi_crop(
            images, ctx.generator, n_large=self.n_large, n_small=self.n_small_crops, small_size=self.small_size
        )
        z = self.embed_crops(crops)  # [V*B, D]
        scores = list(self.prototypes(z).split(b))  # V x [B, K]
        codes = self.compute_codes(scores)
        if self.queue.shape[1] > 0 and ctx.step >= self.queue_start_step:
            self._pending = z[: self.n_large * b].detach().view(self.n_large, b, -1)
        else:
            self._pending = None
        loss = swapped_prediction_loss(scores, codes, self.temperature)
        with torch.no_grad():  # confidence of the codes: mean of the max assignment
            code_max = torch.stack([q.max(dim=1).values.mean() for q in codes]).mean()
        return {"loss": loss, "code_max": code_max}

    def on_before_optimizer_step(self, ctx: StepContext) -> None:
        # Freeze the prototypes early on (SwAV's freeze_prototypes_niters). The grad is dropped
        # (None, as the official code does) so the optimizer skips them: no momentum, no decay.
        if ctx.step < self.freeze_prototypes_steps:
            self.prototypes.prototypes.weight.grad = None

    @torch.no_grad()
    def on_after_optimizer_step(self, ctx: StepContext) -> None:
        self.prototypes.normalize_()  # SwAV normalises before each forward; same thing, one step earlier
        if self._pending is not None:  # push this step's large-crop embeddings, FIFO, newest first
            length = self.queue.shape[1]
            self.queue.copy_(torch.cat([self._pending, self.queue], dim=1)[:, :length])
            self.queue_count.copy_(torch.clamp(self.queue_count + self._pending.shape[1], max=length))
            self._pending = None
