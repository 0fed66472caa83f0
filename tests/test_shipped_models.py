"""The shipped weights reproduce the metrics written in their configs (offline, CPU)."""

import pytest
import torch

import zoo
from zoo.data import load_dataset, transform_for
from zoo.eval import cluster_metrics, extract_features, knn_top1

# weights inside the package (official url: entries download on first use; tests/test_hub.py covers them)
# (image-text models have their own bar: tests/test_clip_train.py)
SHIPPED = [n for n in zoo.list_models(pretrained=True) if zoo.model_info(n)["weights_source"].startswith("package:")
           and zoo.model_info(n)["architecture"] not in zoo.clip.CLIP_ARCHES]


def test_default_models_are_shipped():
    assert "simclr_convnet_mnist5k" in SHIPPED


@pytest.mark.parametrize("name", SHIPPED)
def test_recorded_knn_reproduces(name):
    model = zoo.create_model(name, pretrained=True)
    metrics = model.pretrained_cfg["metrics"]
    assert model.pretrained_cfg["weights_source"] == f"package:{name}"
    data = model.pretrained_cfg["dataset"]
    train = extract_features(model, load_dataset(data, "train", transform=transform_for(model)), progress=False)
    test = extract_features(model, load_dataset(data, "test", transform=transform_for(model)), progress=False,
                            cluster_probs=model.has_cluster_head)
    knn = knn_top1(train["features"], train["labels"], test["features"], test["labels"])
    assert knn == pytest.approx(metrics["knn_top1"], abs=1e-3)
    assert knn > 0.95  # the spine's bar for the default representation on mnist5k
    if model.has_cluster_head:
        head = cluster_metrics(test["labels"], test["cluster_probs"].argmax(1))
        assert head["acc"] == pytest.approx(metrics["head_acc"], abs=1e-3)
        probs = model.predict_cluster(torch.zeros(2, *model.pretrained_cfg["input_size"]))
        assert probs.shape == (2, model.num_clusters)
