"""Novel category discovery with adaptive prototypes.

The novel-class-discovery setting (Han et al., "Learning to Discover Novel Visual Categories via Deep
Transfer Clustering", ICCV 2019; Fini et al., "A Unified Objective for Novel Class Discovery" (UNO),
ICCV 2021): the classes ``0 .. num_labelled-1`` of the training set are labelled, the others are
novel and their labels are never used. The model keeps one prototype per labelled class (learned by
gradient, the labelled classifier) and ``num_novel`` *adaptive* prototypes for the novel classes
(buffer ``novel_prototypes [K,D]``): an exponential moving average of the embeddings assigned to
each, so they follow the representation as it changes.

Loss (:func:`ncd_loss`) over the logits ``z . [labelled prototypes; novel prototypes] / tau``:

- labelled images: cross entropy with their class;
- unlabelled images (those of novel classes): swapped prediction as UNO, the Sinkhorn-balanced
  assignment over the novel prototypes of one view (``train.sinkhorn.sinkhorn_knopp``) is the target of
  the other view's softmax over *all* prototypes (so a novel image is also pushed away from the
  labelled classes).

After each step the novel prototypes move towards the mean embedding of the images assigned to them
(``momentum``); they start at step 0 from k-means++ picks among the first batch's unlabelled
embeddings. The protocol (:func:`ncd_protocol`, ``benchmarks/ncd.py``): on ``mnist5k`` with 5 labelled
and 5 novel classes, Hungarian ACC on the test images of the novel classes (predicted among the novel
prototypes) and on all test images (predicted among all prototypes, one Hungarian map over all).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from train.distributed import all_gather_rows
from train.methods.base import Method, StepContext, register_method
from train.sinkhorn import sinkhorn_knopp
from zoo.heads import ProjectionHead
from zoo.model import ZooModel


def ncd_loss(logits1: torch.Tensor, logits2: torch.Tensor, labels: torch.Tensor, num_labelled: int,
             targets1: torch.Tensor, targets2: torch.Tensor) -> torch.Tensor:
    """Cross entropy on labelled rows and swapped prediction on unlabelled rows.

    Args:
        logits1, logits2: ``[B, L+K]`` logits of the two views against the L labelled and K novel prototypes.
        labels: ``[B]``; rows with ``labels < num_labelled`` are labelled, the others unlabelled.
        targets1, targets2: ``[U, K]`` soft targets over the novel prototypes of the U unlabelled rows
            (Sinkhorn assignments of view 1 and view 2).

    Returns:
        scalar: the mean over the 2B rows (both views) of ``-log softmax(logits_v)[y]`` for labelled rows and
        ``-sum_k t_{other view,k} log softmax(logits_v)[L + k]`` for unlabelled rows.
    """
    lab = labels < num_labelled
    terms = []
    for logits, swapped in ((logits1, targets2), (logits2, targets1)):
        logp = F.log_softmax(logits, dim=1)
        if bool(lab.any()):
            terms.append(-logp[lab].gather(1, labels[lab].view(-1, 1)).squeeze(1))
        if bool((~lab).any()):
            terms.append(-(swapped * logp[~lab, num_labelled:]).sum(dim=1))
    return torch.cat(terms).mean()


def kmeanspp_init(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """``[k,D]`` k-means++ seeds (Arthur & Vassilvitskii 2007) among the rows of ``x [N,D]`` (N >= k)."""
    if x.shape[0] < k:
        raise ValueError(f"k-means++ needs at least {k} rows, got {x.shape[0]}")
    first = int(torch.randint(x.shape[0], (1,), generator=generator))
    centres = [x[first]]
    d2 = (x - x[first]).pow(2).sum(dim=1)
    for _ in range(1, k):
        probs = d2 / d2.sum() if float(d2.sum()) > 0 else torch.full_like(d2, 1 / len(d2))
        nxt = int(torch.multinomial(probs.cpu().double(), 1, generator=generator))
        centres.append(x[nxt])
        d2 = torch.minimum(d2, (x - x[nxt]).pow(2).sum(dim=1))
    return torch.stack(centres)


@register_method("ncd")
class NCD(Method):
    """Encoder + projector, labelled prototypes (learned) and adaptive novel prototypes (EMA buffers)."""

    def __init__(self, model: ZooModel, num_labelled: int = 5, num_novel: int = 5, proj_hidden_dim: int = 512,
                 proj_dim: int = 128, temperature: float = 0.1, momentum: float = 0.9, epsilon: float = 0.05,
                 sinkhorn_iters: int = 3):
        super().__init__(model)
        if num_labelled < 1 or num_novel < 1:
            raise ValueError(f"need num_labelled >= 1 and num_novel >= 1, got {num_labelled} and {num_novel}")
        self.num_labelled, self.num_novel = num_labelled, num_novel
        self.temperature, self.momentum, self.epsilon, self.sinkhorn_iters = temperature, momentum, epsilon, sinkhorn_iters
        self.projector = ProjectionHead(model.num_features, proj_hidden_dim, proj_dim, num_layers=2)
        self.labelled_prototypes = torch.nn.Parameter(F.normalize(torch.randn(num_labelled, proj_dim), dim=1))
        self.register_buffer("novel_prototypes", torch.zeros(num_novel, proj_dim))
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """``[B,3,H,W]`` -> ``[B,D]`` L2-normalised embeddings."""
        return F.normalize(self.projector(self.model.forward_features(x)), dim=1)

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        """``[B,D]`` -> ``[B, L+K]`` cosine logits against all prototypes, divided by tau."""
        protos = torch.cat([F.normalize(self.labelled_prototypes, dim=1), F.normalize(self.novel_prototypes, dim=1)])
        return z @ protos.T / self.temperature

    @torch.no_grad()
    def update_prototypes(self, z: torch.Tensor, assign: torch.Tensor) -> None:
        """Each novel prototype with assigned rows moves to ``m * p + (1 - m) * mean(z_assigned)``."""
        for k in range(self.num_novel):
            rows = z[assign == k]
            if rows.shape[0]:
                self.novel_prototypes[k] = self.momentum * self.novel_prototypes[k] + (1 - self.momentum) * rows.mean(0)

    def training_step(self, images: torch.Tensor, indices: torch.Tensor, ctx: StepContext) -> dict[str, torch.Tensor]:
        labels = self.batch_labels(indices, ctx)
        v1, v2 = ctx.augment.views(images, ctx.generator, 2)
        z1, z2 = self.embed(v1), self.embed(v2)
        unl = labels >= self.num_labelled
        if self.training and not bool(self.initialised):  # from the global batch's unlabelled embeddings
            everyone = all_gather_rows(z1[unl].detach())
            if everyone.shape[0] >= self.num_novel:
                self.novel_prototypes.copy_(kmeanspp_init(everyone, self.num_novel, ctx.generator))
                self.initialised.fill_(True)
        l1, l2 = self.logits(z1), self.logits(z2)
        with torch.no_grad():
            t1 = sinkhorn_knopp(l1[unl, self.num_labelled:].float() * self.temperature, self.epsilon, self.sinkhorn_iters)
            t2 = sinkhorn_knopp(l2[unl, self.num_labelled:].float() * self.temperature, self.epsilon, self.sinkhorn_iters)
        loss = ncd_loss(l1, l2, labels, self.num_labelled, t1.to(l1), t2.to(l2))
        if self.training and bool(unl.any()):
            # every rank moves the prototypes with the global batch's rows: the same prototypes everywhere
            self.update_prototypes(all_gather_rows(z1[unl].detach()), all_gather_rows(t1.argmax(dim=1)))
        return {"loss": loss}

    @torch.no_grad()
    def predict(self, images: torch.Tensor, novel_only: bool = False) -> torch.Tensor:
        """``[B]`` predicted prototype: among the novel ones (0..K-1) or among all (labelled first)."""
        logits = self.logits(self.embed(images))
        return logits[:, self.num_labelled:].argmax(dim=1) if novel_only else logits.argmax(dim=1)


def ncd_protocol(method: NCD, images: torch.Tensor, labels: np.ndarray, batch_size: int = 256) -> dict[str, float]:
    """Hungarian ACC on the novel classes' test images (among the novel prototypes) and on all test images
    (among all prototypes). ``images``: normalised test inputs ``[N,3,H,W]``; ``labels`` ``[N]``."""
    from zoo.eval import cluster_accuracy

    was = method.training
    method.eval()
    preds_novel, preds_all = [], []
    for s in range(0, images.shape[0], batch_size):
        preds_novel.append(method.predict(images[s:s + batch_size], novel_only=True).cpu())
        preds_all.append(method.predict(images[s:s + batch_size]).cpu())
    method.train(was)
    novel = labels >= method.num_labelled
    pn, pa = torch.cat(preds_novel).numpy(), torch.cat(preds_all).numpy()
    return {"novel_acc": cluster_accuracy(labels[novel], pn[novel]), "all_acc": cluster_accuracy(labels, pa),
            "labelled_acc": float((pa[~novel] == labels[~novel]).mean())}
