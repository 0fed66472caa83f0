"""Does a MoCo checkpoint tell its positive from negatives by the image, or only by the keys' age?

    PYTHONPATH=. python benchmarks/moco_queue_probe.py RUN RUN/checkpoints/step_N.safetensors

InfoNCE of 8 fresh training batches (the run's augmentation) against (a) the checkpoint's stored queue and
(b) a queue of the same length re-encoded now by the checkpoint's key encoder from other training images.
(a) well below (b), with (b) at chance ln(K+1), means the stored queue is told apart by its age (the
encoders' drift), not by the images. Also prints the mean cosine of a query with its positive key, with
the stored keys and with the fresh keys.
"""

from __future__ import annotations

import math
import sys
import tempfile

import torch

from train.methods.moco import moco_infonce_loss
from train.trainer import TrainConfig, Trainer


def main() -> None:
    run, ckpt = sys.argv[1], sys.argv[2]
    t = Trainer(TrainConfig.from_yaml(f"{run}/config.yaml"), tempfile.mkdtemp(), progress=False)
    t.load_checkpoint(ckpt)
    m = t.method.train()  # train-mode BN, as the keys in the queue were encoded
    g = torch.Generator().manual_seed(123)
    k_len, n = m.queue.shape[0], len(t.data)

    def views(idx: torch.Tensor) -> list[torch.Tensor]:
        images = t.data.batch(idx)
        a = t.augment
        if a.uses_background:
            a = a.bind(images, t.data.foreground(idx, images, a.cfg.bg_masks))
        return a.views(images, g, 2)

    with torch.no_grad():
        fresh = []
        while sum(f.shape[0] for f in fresh) < k_len:
            fresh.append(m.encode_keys(views(torch.randint(n, (64,), generator=g))[1], g))
        fresh = torch.cat(fresh)[:k_len]
        stats = {"stored": [], "fresh": [], "pos": [], "cos_stored": [], "cos_fresh": []}
        for _ in range(8):
            v1, v2 = views(torch.randint(n, (64,), generator=g))
            q, k = m.encode_queries(v1), m.encode_keys(v2, g)
            stats["stored"].append(moco_infonce_loss(q, k, m.queue, m.temperature).item())
            stats["fresh"].append(moco_infonce_loss(q, k, fresh, m.temperature).item())
            stats["pos"].append((q * k).sum(1).mean().item())
            stats["cos_stored"].append((q @ m.queue.T).mean().item())
            stats["cos_fresh"].append((q @ fresh.T).mean().item())
    mean = {key: sum(v) / len(v) for key, v in stats.items()}
    print(f"{ckpt}: loss stored queue {mean['stored']:.3f}  fresh queue {mean['fresh']:.3f}  "
          f"(chance {math.log(k_len + 1):.3f}); cos q.k+ {mean['pos']:.3f}, q.stored {mean['cos_stored']:.3f}, "
          f"q.fresh {mean['cos_fresh']:.3f}")


if __name__ == "__main__":
    main()
