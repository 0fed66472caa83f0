"""CUDA paths of training: AMP + NHWC + compile steps, SwAV's per-resolution batching, and the
dataset-wide helpers (nearest centroid, streamed Sinkhorn, neighbour mining) against their CPU runs.

Skipped without a GPU (CI has none); run them on a lent GPU machine with ``pytest -m gpu``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from train.clustering import nearest_centroid
from train.methods.scan import mine_neighbors
from train.sinkhorn import sinkhorn_argmax_streamed
from train.trainer import Trainer

from .method_checks import check_resume_bit_exact, tiny_cfg

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

KW = {"simclr": {"proj_hidden_dim": 32, "proj_dim": 16},
      "swav": {"proj_hidden_dim": 32, "proj_dim": 16, "num_prototypes": 10, "n_small_crops": 2}}


@pytest.mark.parametrize("method", ["simclr", "swav"])
@pytest.mark.parametrize("compile_", [False, True])
def test_cuda_steps_with_bf16_nhwc_and_compile_train(tmp_path, method, compile_):
    cfg = tiny_cfg(method=method, method_kwargs=KW[method], device="cuda", amp="bf16", torch_compile=compile_,
                   max_steps=4, batch_size=64)
    t = Trainer(cfg, tmp_path, progress=False)
    before = {k: v.detach().clone() for k, v in t.method.state_dict().items()}
    t.fit()
    assert t.device.type == "cuda" and t.cfg.channels_last
    losses = [h["loss"] for h in t.history]
    assert len(losses) == 4 and all(np.isfinite(losses))
    changed = [k for k, v in t.method.state_dict().items() if v.is_floating_point() and not torch.equal(v, before[k])]
    assert any(k.startswith("model.backbone") for k in changed)
    assert all(p.is_contiguous() for p in t.method.parameters())  # NCHW again for export


def test_cuda_resume_is_exact_in_fp32(tmp_path, monkeypatch):
    """fp32 on the GPU with deterministic cuDNN: an interrupted and resumed run matches an uninterrupted one."""
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    check_resume_bit_exact(tmp_path, method="simclr", method_kwargs=KW["simclr"], device="cuda")


def test_swav_auto_batching_is_one_pass_per_resolution_on_cuda():
    from train.methods.swav import SwAV
    from zoo.model import ZooModel

    def encoder_passes(device: str) -> int:
        method = SwAV(ZooModel("convnet_tiny"), num_prototypes=7, proj_hidden_dim=16, proj_dim=8).to(device)
        calls: list[int] = []
        hook = method.model.backbone.register_forward_hook(lambda *a: calls.append(1))
        crops = [torch.rand(3, 3, 16, 16, device=device) for _ in range(2)]
        crops += [torch.rand(3, 3, 8, 8, device=device) for _ in range(2)]
        method.embed_crops(crops)
        hook.remove()
        return len(calls)

    assert encoder_passes("cpu") == 4 and encoder_passes("cuda") == 2  # per crop; per crop size


def test_dataset_wide_helpers_on_cuda_match_the_cpu():
    gen = torch.Generator().manual_seed(0)
    x, c = torch.randn(5000, 32, generator=gen), torch.randn(40, 32, generator=gen)
    # nearest_centroid moves chunks to the GPU when there is one; an independent numpy argmin
    dist = ((x.numpy()[:, None] - c.numpy()[None]) ** 2).sum(-1)
    assert (nearest_centroid(x, c).numpy() == dist.argmin(1)).mean() > 0.999
    log_probs = (torch.randn(3000, 20, generator=gen) * 2).log_softmax(1)
    cpu = sinkhorn_argmax_streamed(lambda sl: log_probs[sl], 3000, 0.04, 20, chunk=512)
    gpu = sinkhorn_argmax_streamed(lambda sl: log_probs.cuda()[sl], 3000, 0.04, 20, chunk=512)
    assert gpu.is_cuda and (gpu.cpu() == cpu).float().mean() > 0.999
    feats = torch.randn(3000, 16, generator=gen)
    assert (mine_neighbors(feats, 5, backend="auto") == mine_neighbors(feats, 5, backend="torch")).float().mean() > 0.99
