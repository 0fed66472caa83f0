"""Sinkhorn-Knopp: soft equal-partition assignments of samples to clusters, shared by SwAV and SeLa.

Both methods solve the entropy-regularised optimal-transport problem

    max_Q  <Q, S> + epsilon * H(Q)   s.t.  Q 1_K = r,  Q^T 1_N = c,

whose solution is ``Q = diag(u) exp(S / epsilon) diag(v)``, found by alternately rescaling
columns and rows (Cuturi, NeurIPS 2013). SeLa (Asano et al., ICLR 2020) writes it with
``lambda = 1 / epsilon`` over the whole dataset; SwAV (Caron et al., NeurIPS 2020, Alg. 1 /
``distributed_sinkhorn``) runs 3 iterations over a batch. Here the updates are done on
``log Q`` with ``logsumexp``, so small ``epsilon`` (large ``lambda``) never overflows.

Distributed-ready: the rows of ``scores`` may be one rank's shard of a larger problem; the
column sums and the sample count go through :func:`_all_reduce_sum` / :func:`_all_reduce_max`,
which are the identity unless ``torch.distributed`` is initialised. Every rank must call with its
own rows (the same K), as SwAV's batch codes and SeLa's sharded label step do; ``tests/test_distributed.py``
checks that two ranks with half the rows each get exactly the rows of the one-process solution.

:func:`sinkhorn_argmax_streamed` solves the same problem for a dataset whose ``[N,K]`` scores are
too large to hold: it keeps only the ``[N]`` row and ``[K]`` column potentials and recomputes the
scores chunk by chunk (SeLa's label step, from the features it already holds).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _all_reduce(t: torch.Tensor, op: dist.ReduceOp.RedOpType) -> torch.Tensor:
    """``op`` (SUM, MAX) of ``t`` over all ranks (a new tensor); ``t`` itself when not distributed.
    NCCL reduces CUDA tensors only: a CPU tensor travels through the current CUDA device."""
    if not _distributed():
        return t
    if dist.get_backend() == "nccl" and t.device.type != "cuda":
        buf = t.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(buf, op=op)
        return buf.to(t.device)
    t = t.clone()
    dist.all_reduce(t, op=op)
    return t


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    return _all_reduce(t, dist.ReduceOp.SUM)


def _all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    return _all_reduce(t, dist.ReduceOp.MAX)


def _logsumexp_over_samples(log_q: torch.Tensor) -> torch.Tensor:
    """``log sum_n exp(log_q[n, k])`` over the samples of every rank: ``[N,K] -> [1,K]``."""
    m = _all_reduce_max(log_q.max(dim=0, keepdim=True).values)
    return torch.log(_all_reduce_sum(torch.exp(log_q - m).sum(dim=0, keepdim=True))) + m


@torch.no_grad()
def sinkhorn_knopp(
    scores: torch.Tensor,
    epsilon: float = 0.05,
    n_iters: int = 3,
    row_marginal: torch.Tensor | None = None,
    col_marginal: torch.Tensor | None = None,
) -> torch.Tensor:
    """Soft assignments ``Q`` of ``N`` samples to ``K`` clusters with prescribed marginals.

    Args:
        scores: ``[N,K]`` similarities (SwAV: ``z @ prototypes.T``; SeLa: log-probabilities).
            Used detached (no gradient flows through the assignment).
        epsilon: entropic regularisation; ``Q ∝ exp(scores / epsilon)`` before balancing
            (SeLa's ``lambda`` is ``1 / epsilon``).
        n_iters: alternating (columns, then rows) normalisation rounds, at least 1.
        row_marginal: ``[N]`` positive target row sums; default all ones, so each row of ``Q``
            is a distribution over the ``K`` clusters (SwAV returns ``B * Q`` for this reason).
        col_marginal: ``[K]`` positive target column sums; default ``N / K`` each (equal
            partition). Rescaled to the total of ``row_marginal`` (over all ranks), so it may
            also be given as proportions.

    Returns:
        ``[N,K]`` ``Q`` in the dtype of ``scores`` (computed in at least float32). Each
        iteration first rescales columns, then rows, so the row sums equal ``row_marginal``
        exactly (up to rounding) and the column sums approach ``col_marginal`` as ``n_iters``
        grows (SwAV's 3 iterations leave them approximate; SeLa runs to convergence).
        When distributed, ``N`` counts the rows of all ranks and each rank gets its own rows.
    """
    if scores.ndim != 2:
        raise ValueError(f"scores must be [N,K], got shape {tuple(scores.shape)}")
    if n_iters < 1:
        raise ValueError(f"n_iters must be >= 1, got {n_iters}")
    if epsilon <= 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")
    out_dtype, dtype = scores.dtype, torch.promote_types(scores.dtype, torch.float32)
    n, k = scores.shape
    scores = scores.detach().to(dtype)
    # A constant shift of all scores only rescales Q, which the first update undoes: subtract the
    # global max so float32 keeps the scores' spread rather than their magnitude.
    log_q = (scores - _all_reduce_max(scores.max())) / epsilon  # [N,K]
    if row_marginal is None:
        row_marginal = torch.ones(n, dtype=dtype, device=scores.device)
    row_marginal = row_marginal.to(device=scores.device, dtype=dtype)
    if row_marginal.shape != (n,):
        raise ValueError(f"row_marginal must have shape ({n},), got {tuple(row_marginal.shape)}")
    total = _all_reduce_sum(row_marginal.sum())  # N over all ranks with the default marginal
    if col_marginal is None:
        col_marginal = torch.ones(k, dtype=dtype, device=scores.device)
    col_marginal = col_marginal.to(device=scores.device, dtype=dtype)
    if col_marginal.shape != (k,):
        raise ValueError(f"col_marginal must have shape ({k},), got {tuple(col_marginal.shape)}")
    log_r = torch.log(row_marginal).unsqueeze(1)  # [N,1]
    log_c = torch.log(col_marginal * (total / col_marginal.sum())).unsqueeze(0)  # [1,K]
    for _ in range(n_iters):
        log_q = log_q - _logsumexp_over_samples(log_q) + log_c  # column k sums to c_k
        log_q = log_q - torch.logsumexp(log_q, dim=1, keepdim=True) + log_r  # row n sums to r_n
    return torch.exp(log_q).to(out_dtype)


@torch.no_grad()
def sinkhorn_argmax_streamed(
    scores_of: Callable[[slice], torch.Tensor], n: int, epsilon: float = 0.05, n_iters: int = 3,
    chunk: int = 65536,
) -> torch.Tensor:
    """``sinkhorn_knopp(S, epsilon, n_iters).argmax(dim=1)`` without ever holding ``S`` or ``Q`` (``[N,K]``).

    Args:
        scores_of: maps a slice of this rank's rows to their scores ``[rows, K]`` (recomputed, e.g. a
            head applied to stored features), called ``n_iters + 2`` times per row.
        n: this rank's number of rows; under DDP the problem spans every rank's rows, as in
            :func:`sinkhorn_knopp`. epsilon, n_iters: as there (default marginals: rows sum to 1,
            columns to ``N/K``: equal partition).
        chunk: rows per call of ``scores_of``.

    Returns:
        ``[n]`` long: the cluster of each row. In potentials, ``log Q = S/epsilon + a_n + b_k``; each
        iteration's column update ``b = log c - logsumexp_n(S/epsilon + a)`` is one pass over the rows
        that also applies the previous row update ``a = -logsumexp_k(S/epsilon + b)``. The final row
        update only shifts each row, so the argmax needs ``b`` alone. Memory: ``[n]`` + ``[K]`` + a chunk.
    """
    if n_iters < 1 or epsilon <= 0:
        raise ValueError(f"need n_iters >= 1 and epsilon > 0, got {n_iters}, {epsilon}")
    slices = [slice(i, min(n, i + chunk)) for i in range(0, n, chunk)] or [slice(0, 0)]
    local_max = float("-inf")
    for sl in slices:  # first pass: K, the device and the global max
        scores = scores_of(sl)
        k, device = scores.shape[1], scores.device
        if scores.numel():
            local_max = max(local_max, float(scores.max()))
    shift = _all_reduce_max(torch.tensor(local_max, device=device))  # as sinkhorn_knopp: keep the spread

    def scaled(sl: slice) -> torch.Tensor:
        return (scores_of(sl).float() - shift) / epsilon

    total = _all_reduce_sum(torch.tensor(float(n), device=device))
    log_c = torch.log(total / k) * torch.ones(k, device=device)
    a = torch.zeros(n, device=device)
    b = torch.zeros(k, device=device)
    for it in range(n_iters):
        col = torch.full((k,), float("-inf"), device=device)
        for sl in slices:
            s = scaled(sl)
            if it > 0:  # the previous iteration's row update
                a[sl] = -torch.logsumexp(s + b, dim=1)
            col = torch.logaddexp(col, torch.logsumexp(s + a[sl].unsqueeze(1), dim=0))
        m = _all_reduce_max(col)  # logsumexp over the ranks' rows
        b = log_c - (torch.log(_all_reduce_sum(torch.exp(col - m))) + m)
    return torch.cat([(scaled(sl) + b).argmax(dim=1) for sl in slices])
