"""MoCHi: Hard Negative Mixing for Contrastive Learning (Kalantidis et al., NeurIPS 2020).

MoCo v2 (query encoder, momentum key encoder, queue: all reused from :mod:`train.methods.moco`)
plus synthetic hard negatives made on the fly for every query. The queue is sorted by similarity to
the query and its ``N`` closest keys are the hardest negatives. From them:

- ``s`` synthetic negatives ``h = normalize(a n_i + (1 - a) n_j)`` mix two random hardest negatives
  ``n_i, n_j`` with ``a ~ U(0, 1)``;
- ``s'`` harder ones ``h' = normalize(b q + (1 - b) n_j)`` mix the query itself into a random
  hardest negative with ``b ~ U(0, 0.5)``, so the query never dominates the mix.

The paper calls the method MoCHi(N, s, s'); here ``num_hardest`` = N, ``num_synthetic`` = s,
``num_query_mix`` = s'. The synthetic points are extra negatives in the InfoNCE denominator of their
own query only; they carry no gradient and never enter the queue. Indices and coefficients are drawn
from the step's generator, so a resumed run mixes the same points. Under DDP the queue is global (every
rank's keys, as in MoCo) and the draws are per sample of the global batch, so W ranks with batch B
train as one process with batch W*B.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from train.augment import rand_per_sample, randint_per_sample
from train.methods.base import StepContext, register_method
from train.methods.moco import MoCo, moco_infonce_loss
from zoo.model import ZooModel


class MixedNegatives(NamedTuple):
    """Synthetic negatives of a batch of queries and how each was made."""

    negatives: torch.Tensor  # [B, s + s', D] L2-normalised: the s hardest-pair mixes, then the s' query mixes
    hardest: torch.Tensor  # [B, N] queue rows of each query's N hardest negatives, most similar first
    pairs: torch.Tensor  # [B, s, 2] positions in ``hardest`` of the two negatives of each pair mix
    alpha: torch.Tensor  # [B, s] weight of the first negative, in [0, 1)
    partners: torch.Tensor  # [B, s'] position in ``hardest`` of the negative each query mix uses
    beta: torch.Tensor  # [B, s'] weight of the query, in [0, 0.5)


@torch.no_grad()
def mix_hard_negatives(
    q: torch.Tensor, queue: torch.Tensor, num_hardest: int, num_synthetic: int, num_query_mix: int,
    generator: torch.Generator,
) -> MixedNegatives:
    """Hard negative mixing (Kalantidis et al. 2020, sec. 4): synthetic negatives for each query.

    Args:
        q: ``[B,D]`` queries (any scale; L2-normalised here, and detached).
        queue: ``[K,D]`` L2-normalised negatives (MoCo's queue).
        num_hardest: N, how many of the most similar queue entries count as hard (clipped to K).
        num_synthetic: s, mixes of two hard negatives. num_query_mix: s', mixes of the query and a hard negative.
        generator: draws the pairs, partners and mixing coefficients (on the CPU).

    Returns:
        :class:`MixedNegatives`; ``negatives`` is ``[B, s + s', D]``, every row L2-normalised.
    """
    b, device = q.shape[0], q.device
    q = F.normalize(q.detach(), dim=1)
    n = min(num_hardest, queue.shape[0])
    if n < 1:
        raise ValueError(f"num_hardest must be >= 1, got {num_hardest}")
    hardest = (q @ queue.T).topk(n, dim=1).indices  # [B,N]
    hard = queue[hardest]  # [B,N,D]
    rows = torch.arange(b, device=device).unsqueeze(1)
    # Per-query draws: under DDP each rank takes its rows of the global batch's draws (as augmentation does),
    # so W ranks with batch B mix exactly as one process with batch W*B.
    pairs = randint_per_sample(n, b, generator, (num_synthetic, 2)).to(device)
    alpha = rand_per_sample(b, generator, (num_synthetic, 1)).to(device)
    mixed = alpha * hard[rows, pairs[..., 0]] + (1 - alpha) * hard[rows, pairs[..., 1]]  # [B,s,D]
    partners = randint_per_sample(n, b, generator, (num_query_mix,)).to(device)
    beta = 0.5 * rand_per_sample(b, generator, (num_query_mix, 1)).to(device)
    query_mixed = beta * q.unsqueeze(1) + (1 - beta) * hard[rows, partners]  # [B,s',D]
    negatives = F.normalize(torch.cat([mixed, query_mixed], dim=1), dim=2)
    return MixedNegatives(negatives, hardest, pairs, alpha.squeeze(2), partners, beta.squeeze(2))


def mochi_infonce_loss(
    q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, synthetic: torch.Tensor, temperature: float = 0.2,
) -> torch.Tensor:
    """MoCo's InfoNCE with per-query synthetic negatives added to the denominator (Kalantidis et al. 2020).

    Args:
        q: ``[B,D]`` queries, k: ``[B,D]`` positive keys (any scale; L2-normalised here).
        queue: ``[K,D]`` L2-normalised negatives shared by all queries.
        synthetic: ``[B,S,D]`` L2-normalised negatives of each query (S may be 0).
        temperature: tau.

    Returns:
        scalar: cross entropy over ``[B, 1+K+S]`` logits ``[q.k, q.queue, q.synthetic_i] / tau`` with the
        positive at index 0. With ``S = 0`` it is :func:`train.methods.moco.moco_infonce_loss`. No gradient
        flows into ``k``, ``queue`` or ``synthetic``.
    """
    q = F.normalize(q, dim=1)
    k = F.normalize(k.detach(), dim=1)
    l_pos = (q * k).sum(dim=1, keepdim=True)  # [B,1]
    l_neg = q @ queue.detach().T  # [B,K]
    l_syn = torch.einsum("bd,bsd->bs", q, synthetic.detach())  # [B,S]
    logits = torch.cat([l_pos, l_neg, l_syn], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))


@register_method("mochi")
class MoCHi(MoCo):
    """MoCo v2 + hard negative mixing. ``moco_kwargs`` are :class:`~train.methods.moco.MoCo`'s arguments.

    ``mix_start_epoch``: epochs of plain MoCo v2 before mixing starts (0: mix from the first step; a
    warm-up keeps the mixing away from the random initial queue).
    """

    def __init__(
        self, model: ZooModel, num_hardest: int = 1024, num_synthetic: int = 1024, num_query_mix: int = 128,
        mix_start_epoch: int = 0, **moco_kwargs: Any,
    ):
        super().__init__(model, **moco_kwargs)
        if num_hardest < 1 or num_synthetic < 0 or num_query_mix < 0:
            raise ValueError(f"need num_hardest >= 1 and num_synthetic, num_query_mix >= 0; got "
                             f"{num_hardest}, {num_synthetic}, {num_query_mix}")
        self.num_hardest = num_hardest
        self.num_synthetic = num_synthetic
        self.num_query_mix = num_query_mix
        self.mix_start_epoch = mix_start_epoch

    def query_loss(self, q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        if ctx.epoch < self.mix_start_epoch:
            return moco_infonce_loss(q, k, queue, self.temperature)
        mixed = mix_hard_negatives(q, queue, self.num_hardest, self.num_synthetic, self.num_query_mix, ctx.generator)
        return mochi_infonce_loss(q, k, queue, mixed.negatives, self.temperature)
