"""MoCo v2: Momentum Contrast (He et al., CVPR 2020) with the improvements of Chen et al. 2020,
"Improved Baselines with Momentum Contrastive Learning" (MLP head, temperature 0.2, stronger augmentation).

A query encoder (``self.model`` + 2-layer MLP without BN) is trained with InfoNCE: each query must pick
its positive key (the other view of the same image, encoded by a slowly moving *key encoder*) among
the negatives held in a FIFO queue of keys from earlier batches. The key encoder receives no gradient;
it follows the query encoder by a momentum (exponential moving average) update after every step.
``export()`` returns the query encoder: the key encoder and the queue are training-only state.
"""

from __future__ import annotations

import copy
from itertools import chain

import torch
import torch.nn.functional as F
from torch import nn

from train.distributed import all_gather_rows, get_rank, is_distributed
from train.methods.base import Method, StepContext, register_method
from train.methods.unmix import mix_batch, soft_mixture_loss, unmix_log, unmix_mode
from zoo.heads import ProjectionHead
from zoo.model import ZooModel


def moco_infonce_loss(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """InfoNCE with a queue of negatives (He et al. 2020, eq. 1).

    Args:
        q: ``[B,D]`` queries (any scale; L2-normalised here).
        k: ``[B,D]`` positive keys, row i is the key of query i (any scale; L2-normalised here).
        queue: ``[K,D]`` negative keys, rows already L2-normalised (as MoCo stores them).
        temperature: tau in ``exp(q.k / tau)``.

    Returns:
        scalar: mean over the B queries of ``-log exp(q.k+/tau) / (exp(q.k+/tau) + sum_j exp(q.n_j/tau))``,
        i.e. cross entropy over ``B x (1+K)`` logits with the positive at index 0. No gradient flows into
        ``k`` or ``queue``.
    """
    q = F.normalize(q, dim=1)
    k = F.normalize(k.detach(), dim=1)
    l_pos = (q * k).sum(dim=1, keepdim=True)  # [B,1]
    l_neg = q @ queue.detach().T  # [B,K]
    logits = torch.cat([l_pos, l_neg], dim=1) / temperature  # [B,1+K]
    labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    return F.cross_entropy(logits, labels)


@torch.no_grad()
def momentum_update(online: nn.Module, target: nn.Module, m: float) -> None:
    """In place, for every parameter: ``target = m * target + (1 - m) * online`` (He et al. 2020, eq. 2).

    ``online`` and ``target`` must have the same architecture. Buffers (BatchNorm running statistics)
    are not averaged: as in the official MoCo and BYOL code, the target keeps the statistics of its
    own forward passes in train mode.
    """
    online_params, target_params = list(online.parameters()), list(target.parameters())
    if len(online_params) != len(target_params):
        raise ValueError(f"online has {len(online_params)} parameters, target {len(target_params)}")
    for o, t in zip(online_params, target_params):
        if o.shape != t.shape:
            raise ValueError(f"parameter shapes differ: online {tuple(o.shape)}, target {tuple(t.shape)}")
    with torch.no_grad():  # one fused multi-tensor op instead of a Python loop over parameters
        torch._foreach_mul_(target_params, m)
        torch._foreach_add_(target_params, torch._foreach_mul([o.detach() for o in online_params], 1 - m))


def copy_weights_(online: nn.Module, target: nn.Module) -> None:
    """``target <- online`` for parameters and buffers (the momentum encoder's initial state)."""
    with torch.no_grad():
        for o, t in zip(chain(online.parameters(), online.buffers()), chain(target.parameters(), target.buffers())):
            t.copy_(o)


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` with ``requires_grad=False`` everywhere (never in the optimizer)."""
    twin = copy.deepcopy(module)
    for p in twin.parameters():
        p.requires_grad_(False)
    return twin


@register_method("moco")
class MoCo(Method):
    """MoCo v2: query encoder + MLP head, momentum key encoder, FIFO queue of ``queue_length`` keys.

    Shuffling BN. BatchNorm lets a query and its positive key "communicate" when both are normalised
    with statistics of the same group of samples, which MoCo prevents in DDP by shuffling the key
    batch across GPUs. On one process each encoder normalises with the statistics of its whole batch,
    and permuting that batch changes nothing; so the keys are computed in train mode on a batch
    shuffled with a permutation from ``ctx.generator`` (then unshuffled), split into ``bn_splits``
    groups that each get their own BN statistics, while the queries are computed on the unshuffled
    batch split the same way: this simulates ``bn_splits`` GPUs, as the official MoCo CIFAR-10 demo
    does with SplitBatchNorm. ``bn_splits=1`` (the default) leaves BN over the whole batch; set it to
    e.g. 8 for a single-process run that should not leak.

    Under DDP the keys are encoded on a batch shuffled across ranks (the official ``batch_shuffle_ddp``:
    every rank draws the same permutation of the global batch from the shared generator, encodes its
    slice, and the keys go back to their images' ranks), and the queue receives the keys of every rank,
    so it holds the same global keys on all ranks. With the trainer's ``sync_bn`` the BN statistics
    already span the global batch and the keys are encoded where their images are, unshuffled.
    """

    def __init__(
        self, model: ZooModel, proj_hidden_dim: int = 2048, proj_dim: int = 128, queue_length: int = 4096,
        momentum: float = 0.999, temperature: float = 0.2, symmetric: bool = False, bn_splits: int = 1,
        unmix: bool = False, unmix_alpha: float = 1.0, proj_batch_norm: bool = False,
        proj_last_bn: bool = False,
    ):
        super().__init__(model)
        self.unmix, self.unmix_alpha = unmix, unmix_alpha  # Un-Mix option (train/methods/unmix.py)
        if queue_length < 1 or bn_splits < 1:
            raise ValueError(f"queue_length ({queue_length}) and bn_splits ({bn_splits}) must be >= 1")
        # MoCo v2's head: Linear-ReLU-Linear, no BatchNorm. The two options are MoCo v3's projector
        # (facebookresearch/moco-v3, moco/builder.py: _build_mlp): ``proj_batch_norm`` puts BN after the
        # hidden layer (Linear-BN-ReLU-Linear), ``proj_last_bn`` an affine-free BN on the output. The output
        # BN centres every BN group's keys, so a key's age (the drift of the key encoder, a common offset of
        # all keys of one step) cannot tell the current positive from the queue's older keys. The key head
        # gets the same BN, computed per ``bn_splits`` group like the encoder's.
        self.projector = ProjectionHead(model.num_features, proj_hidden_dim, proj_dim, num_layers=2,
                                        batch_norm=proj_batch_norm, last_bn=proj_last_bn)
        self.key_model = frozen_copy(model)
        self.key_projector = frozen_copy(self.projector)
        self.momentum = momentum
        self.temperature = temperature
        self.symmetric = symmetric
        self.bn_splits = bn_splits
        # Random unit vectors until real keys replace them, as in the official code.
        self.register_buffer("queue", F.normalize(torch.randn(queue_length, proj_dim), dim=1))  # [K,D]
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    # -- encoders -------------------------------------------------------------------------
    def encode_queries(self, x: torch.Tensor) -> torch.Tensor:
        """``[B,3,H,W] -> [B,D]`` L2-normalised queries, BN over ``bn_splits`` groups of the batch."""
        q = torch.cat([self.projector(self.model.forward_features(c)) for c in x.chunk(self.bn_splits)])
        return F.normalize(q, dim=1)

    @torch.no_grad()
    def encode_keys(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """``[B,3,H,W] -> [B,D]`` L2-normalised keys from the key encoder, computed on a shuffled batch
        (single-process shuffle BN, see the class docstring) and returned in the original order."""
        if is_distributed() and not self._bn_synced():
            return self._encode_keys_across_ranks(x, generator)
        if self.bn_splits == 1:  # one BN group: batch order cannot change its statistics, skip the copies
            return F.normalize(self.key_projector(self.key_model.forward_features(x)), dim=1)
        perm = torch.randperm(x.shape[0], generator=generator).to(x.device)
        shuffled = x[perm]
        k = torch.cat([self.key_projector(self.key_model.forward_features(c)) for c in shuffled.chunk(self.bn_splits)])
        unshuffled = torch.empty_like(k)
        unshuffled[perm] = k  # row perm[i] of the batch was encoded at position i
        return F.normalize(unshuffled, dim=1)

    def _bn_synced(self) -> bool:
        """True when the key encoder's BatchNorm already spans all ranks (``sync_bn``): no shuffle needed,
        and none of the image gathering it costs (MoCo v3 replaces shuffle BN by SyncBN likewise)."""
        from train.distributed import GlobalBatchNorm

        return any(isinstance(m, (torch.nn.SyncBatchNorm, GlobalBatchNorm)) for m in self.key_model.modules())

    @torch.no_grad()
    def _encode_keys_across_ranks(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Shuffle BN across ranks: this rank's keys ``[B,D]``, each encoded within another rank's BN batch."""
        b, rank = x.shape[0], get_rank()
        everyone = all_gather_rows(x)  # [W*B,3,H,W]
        perm = torch.randperm(everyone.shape[0], generator=generator).to(x.device)  # same on every rank
        mine = everyone[perm[rank * b : (rank + 1) * b]]
        k = torch.cat([self.key_projector(self.key_model.forward_features(c)) for c in mine.chunk(self.bn_splits)])
        shuffled = all_gather_rows(k)  # row i: key of global image perm[i]
        keys = torch.empty_like(shuffled)
        keys[perm] = shuffled
        return F.normalize(keys[rank * b : (rank + 1) * b], dim=1)

    # -- queue ----------------------------------------------------------------------------
    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Write ``keys [N,D]`` into the FIFO queue at ``queue_ptr`` (overwriting the oldest entries).

        The official code requires ``queue_length % batch_size == 0``; here the write wraps: the
        batch is written in two pieces, the first up to the end of the queue, the rest from index 0,
        and ``queue_ptr`` advances by N modulo the queue length. When N exceeds the queue length only
        the newest ``queue_length`` keys survive, exactly as if the keys were written one at a time.
        """
        size, n = self.queue.shape[0], keys.shape[0]
        ptr = int(self.queue_ptr)
        if n > size:
            keys = keys[n - size:]
            ptr = (ptr + n - size) % size
        m = keys.shape[0]
        first = min(m, size - ptr)
        self.queue[ptr:ptr + first] = keys[:first]
        self.queue[:m - first] = keys[first:]
        self.queue_ptr.fill_((ptr + m) % size)

    # -- training -------------------------------------------------------------------------
    def query_loss(self, q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """The loss of queries ``q [B,D]`` against their keys ``k [B,D]`` and the queue (MoCHi overrides it)."""
        return moco_infonce_loss(q, k, queue, self.temperature)

    def training_step(self, images: torch.Tensor, indices: torch.Tensor, ctx: StepContext) -> dict[str, torch.Tensor]:
        v1, v2 = ctx.augment.views(images, ctx.generator, 2)
        # The loss needs the queue as it was before this batch's keys are enqueued (and autograd
        # keeps it for backward), so use a copy.
        queue = self.queue.clone()
        q1 = self.encode_queries(v1)
        k2 = self.encode_keys(v2, ctx.generator)
        if self.symmetric:
            q2 = self.encode_queries(v2)
            k1 = self.encode_keys(v1, ctx.generator)
            loss = 0.5 * (self.query_loss(q1, k2, queue, ctx) + self.query_loss(q2, k1, queue, ctx))
            keys = [k2, k1]
        else:
            loss = self.query_loss(q1, k2, queue, ctx)
            keys = [k2]
        if self.unmix:  # view 1 mixed within the batch: its queries against both sources' keys (and the queue)
            mix = mix_batch(v1, ctx.generator, unmix_mode(ctx.step), self.unmix_alpha)
            q_mix = self.encode_queries(mix.images)
            mix_loss = soft_mixture_loss(lambda q, k: self.query_loss(q, k, queue, ctx), q_mix, k2, mix.lam)
            loss = loss + mix_loss
        if self.training:  # evaluating the loss (model.eval()) leaves the queue alone
            # under DDP: the keys of every rank, in rank order, view by view (as one process's batch)
            self.enqueue(torch.cat([all_gather_rows(k) for k in keys]))
        if self.unmix:
            return {"loss": loss, **unmix_log(mix, mix_loss)}
        return {"loss": loss}

    def on_train_start(self, ctx: StepContext) -> None:
        if ctx.step == 0:  # the key encoder starts as a copy of the query encoder
            copy_weights_(self.model, self.key_model)
            copy_weights_(self.projector, self.key_projector)

    def on_after_optimizer_step(self, ctx: StepContext) -> None:
        momentum_update(self.model, self.key_model, self.momentum)
        momentum_update(self.projector, self.key_projector, self.momentum)
