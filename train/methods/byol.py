"""BYOL: Bootstrap Your Own Latent (Grill et al., NeurIPS 2020).

An online network (``self.model`` + projector + predictor) regresses the projection that a target
network (an exponential moving average of encoder + projector, no gradient) gives for the other view
of the same image. No negatives: the predictor and the slowly moving target prevent collapse.
``export()`` returns the online encoder; the target network is training-only state.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from train.distributed import all_reduce_mean
from train.methods.base import Method, StepContext, register_method
from train.methods.moco import copy_weights_, frozen_copy, momentum_update
from train.methods.unmix import mix_batch, soft_mixture_loss, unmix_log, unmix_mode
from zoo.heads import ProjectionHead
from zoo.model import ZooModel


def byol_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """BYOL's regression loss (Grill et al. 2020, eq. 2): ``||p/|p| - z/|z| ||^2 = 2 - 2 cos(p, z)``.

    Args:
        p: ``[B,D]`` online predictions for one view.
        z: ``[B,D]`` target projections of the other view (no gradient flows into them).

    Returns:
        scalar: the mean over the batch, in [0, 4] (0 when aligned, 4 when opposite).
    """
    cos = (F.normalize(p, dim=1) * F.normalize(z.detach(), dim=1)).sum(dim=1)  # [B]
    return (2 - 2 * cos).mean()


def ema_momentum(step: int, total: int, base: float = 0.996) -> float:
    """BYOL's target decay rate at ``step`` of ``total``: ``1 - (1 - base) * (cos(pi * step / total) + 1) / 2``.

    ``base`` at step 0, rising along a cosine to 1.0 at the end of the schedule (Grill et al. 2020, sec. 3.2).
    """
    progress = min(1.0, max(0.0, step / max(1, total)))
    return 1 - (1 - base) * (math.cos(math.pi * progress) + 1) / 2


def direct_pred_weight(corr: torch.Tensor, eps: float = 0.01) -> torch.Tensor:
    """DirectPred's predictor from a correlation matrix (Tian, Chen & Ganguli, ICML 2021, eq. 18-19).

    With ``corr = U diag(s) U^T`` (eigenvalues clamped at 0), ``W = U diag(p) U^T`` where
    ``p_j = sqrt(s_j / max(s)) + eps``: the predictor shares the eigenvectors of the representation's
    correlation and boosts its weak directions (the official code's ``predictor_reg=corr``,
    ``balance_type=boost_scale``, ``dyn_convert=2``, ``dyn_eps``).

    Args:
        corr: ``[D,D]`` symmetric positive semi-definite matrix.
        eps: added to every normalised eigenvalue root.

    Returns:
        ``[D,D]`` symmetric weight, in ``corr``'s dtype (the eigendecomposition runs in float64).
    """
    s, u = torch.linalg.eigh(corr.double())
    s = s.clamp(min=0)
    p = (s / s.max().clamp(min=1e-30)).sqrt() + eps
    return ((u * p) @ u.T).to(corr.dtype)


@register_method("byol")
class BYOL(Method):
    """Online encoder + projector + predictor, EMA target encoder + projector; symmetrised 2 - 2 cos loss."""

    def __init__(
        self, model: ZooModel, proj_hidden_dim: int = 4096, proj_dim: int = 256, pred_hidden_dim: int = 4096,
        tau_base: float = 0.996, unmix: bool = False, unmix_alpha: float = 1.0, predictor_lr_mult: float = 1.0,
        proj_last_bn: bool = False, linear_predictor: bool = False, direct_pred: bool = False,
        direct_pred_rho: float = 0.3, direct_pred_eps: float = 0.01,
    ):
        super().__init__(model)
        if predictor_lr_mult <= 0:
            raise ValueError(f"predictor_lr_mult must be > 0, got {predictor_lr_mult}")
        if not 0 <= direct_pred_rho < 1:
            raise ValueError(f"direct_pred_rho must be in [0, 1), got {direct_pred_rho}")
        # Not in BYOL itself: DirectPred (Tian, Chen & Ganguli, ICML 2021: a relatively larger learning rate for
        # the predictor than for the encoder helps BYOL/SimSiam) and SimSiam (Chen & He, CVPR 2021: the
        # predictor at a fixed, undecayed lr works better) let the predictor learn faster than the encoder.
        self.predictor_lr_mult = float(predictor_lr_mult)
        self.unmix, self.unmix_alpha = unmix, unmix_alpha  # Un-Mix option (train/methods/unmix.py)
        # Projector and predictor: Linear-BN-ReLU-Linear (Grill et al. 2020, sec. 3.3).
        # ``proj_last_bn``: BN (no affine) on the projector's output too, as SimSiam's projector has (Chen & He,
        # CVPR 2021, sec. 4: "BN applied to each fully-connected layer, including its output fc"). Not in BYOL.
        # Why here: with heavy nuisance augmentation the target projection is mostly its batch mean, so the
        # predictor learns to output that constant and the encoder gets no gradient; a centred target
        # cannot be matched by a constant (docs/benchmarks.md, "Shape-aware clusters", the BYOL probes).
        self.projector = ProjectionHead(model.num_features, proj_hidden_dim, proj_dim, num_layers=2, batch_norm=True,
                                        last_bn=proj_last_bn)
        # ``linear_predictor``: one bias-free linear map, the predictor that DirectPred analyses and trains (Tian,
        # Chen & Ganguli, ICML 2021, sec. 3 and 6: a linear predictor trained by gradient works as well as the
        # MLP). On centred projections (``proj_last_bn``) its output has batch mean 0 exactly: it cannot fall
        # back to predicting a constant, which the MLP (ReLU hidden units have a positive mean) can.
        self.predictor: nn.Module = (
            nn.Linear(proj_dim, proj_dim, bias=False) if linear_predictor or direct_pred
            else ProjectionHead(proj_dim, pred_hidden_dim, proj_dim, num_layers=2, batch_norm=True)
        )
        # ``direct_pred``: DirectPred (Tian, Chen & Ganguli, ICML 2021, sec. 5): the linear predictor is not
        # trained but set, every step, from a moving average F of the online projections' correlation
        # E[f f^T] (rate ``direct_pred_rho``, both views): W = direct_pred_weight(F). Its recommended
        # setting is freq 1, rho 0.3, eps 0.01 (the official repository's README). One difference: F takes
        # the current batch in before W is set, so step 0 has a defined predictor (the official code keeps
        # the random initial W until F exists). Under DDP F averages every rank's correlation.
        self.direct_pred, self.direct_pred_rho, self.direct_pred_eps = direct_pred, direct_pred_rho, direct_pred_eps
        if direct_pred:
            self.predictor.requires_grad_(False)
            self.register_buffer("pred_corr", torch.zeros(proj_dim, proj_dim))
            self.register_buffer("pred_corr_steps", torch.zeros((), dtype=torch.long))
        self.target_model = frozen_copy(model)
        self.target_projector = frozen_copy(self.projector)
        self.tau_base = tau_base

    def param_groups(self) -> list[dict]:
        """Encoder + projector at the recipe's rate, the predictor at ``predictor_lr_mult`` x it."""
        if self.predictor_lr_mult == 1.0:  # one group, as before the option: older checkpoints still resume
            return super().param_groups()
        pred = {id(p) for p in self.predictor.parameters()}
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in pred]
        return [{"params": rest}, {"params": list(self.predictor.parameters()), "lr_mult": self.predictor_lr_mult}]

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Online encoder + projector: ``[B,3,H,W] -> [B,proj_dim]`` projections (the predictor's input)."""
        return self.projector(self.model.forward_features(x))

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Online network: ``[B,3,H,W] -> [B,proj_dim]`` predictions."""
        return self.predictor(self.project(x))

    @torch.no_grad()
    def set_direct_predictor(self, f: torch.Tensor) -> None:
        """DirectPred: ``F <- rho F + (1 - rho) mean(f f^T)`` over the ``[N,proj_dim]`` online projections
        ``f`` (every rank's under DDP; the first call sets ``F``), then the predictor weight ``W(F)``."""
        corr = all_reduce_mean(f.T @ f / f.shape[0])
        rho = self.direct_pred_rho if int(self.pred_corr_steps) > 0 else 0.0
        self.pred_corr.mul_(rho).add_(corr, alpha=1 - rho)
        self.pred_corr_steps += 1
        self.predictor.weight.copy_(direct_pred_weight(self.pred_corr, self.direct_pred_eps))

    @torch.no_grad()
    def target(self, x: torch.Tensor) -> torch.Tensor:
        """Target network (in the method's mode, so train-mode BN as in the paper): ``[B,3,H,W] -> [B,proj_dim]``."""
        return self.target_projector(self.target_model.forward_features(x))

    def training_step(self, images: torch.Tensor, indices: torch.Tensor, ctx: StepContext) -> dict[str, torch.Tensor]:
        v1, v2 = ctx.augment.views(images, ctx.generator, 2)
        # Each view is its own forward pass (its own BN statistics), as in the official implementation.
        f1, f2 = self.project(v1), self.project(v2)
        if self.direct_pred:
            self.set_direct_predictor(torch.cat([f1, f2]).detach())
        p1, p2 = self.predictor(f1), self.predictor(f2)
        z1, z2 = self.target(v1), self.target(v2)
        # Symmetrised: L + L~ (eq. 2 and the sentence after it), so the loss lies in [0, 8].
        loss = byol_loss(p1, z2) + byol_loss(p2, z1)
        if self.unmix:  # view 1 mixed within the batch regresses both sources' targets of view 2
            mix = mix_batch(v1, ctx.generator, unmix_mode(ctx.step), self.unmix_alpha)
            mix_loss = soft_mixture_loss(byol_loss, self.predict(mix.images), z2, mix.lam)
            return {"loss": loss + mix_loss, **unmix_log(mix, mix_loss)}
        return {"loss": loss}

    def on_train_start(self, ctx: StepContext) -> None:
        if ctx.step == 0:  # the target starts as a copy of the online network
            copy_weights_(self.model, self.target_model)
            copy_weights_(self.projector, self.target_projector)

    def on_after_optimizer_step(self, ctx: StepContext) -> None:
        tau = ema_momentum(ctx.step, ctx.total_steps, self.tau_base)
        momentum_update(self.model, self.target_model, tau)
        momentum_update(self.projector, self.target_projector, tau)
