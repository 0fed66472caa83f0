"""Evaluation protocols on frozen features: weighted kNN, linear probe, k-means, cluster metrics,
reverse linear probing, few-shot episodes, long-tailed accuracy; plots; the leaderboard.

>>> from zoo.eval import evaluate
>>> evaluate(model, "mnist5k", protocols=("knn", "kmeans"))  # doctest: +SKIP
{'knn_top1': ..., 'kmeans_acc': ..., 'kmeans_nmi': ..., 'kmeans_ari': ..., 'dataset': 'mnist5k', ...}
"""

from zoo.eval.cluster import kmeans, kmeans_metrics
from zoo.eval.features import extract_features
from zoo.eval.fewshot import confidence_interval, fewshot_eval, nearest_centroid_accuracy, sample_episodes
from zoo.eval.knn import knn_predict, knn_top1
from zoo.eval.linear import linear_probe
from zoo.eval.longtail import evaluate_longtail, shot_accuracy
from zoo.eval.metrics import ari, cluster_accuracy, cluster_metrics, contingency, hungarian_match, nmi
from zoo.eval.plots import (
    plot_cluster_gallery,
    plot_confusion,
    plot_embedding_2d,
    plot_training_curves,
    write_eval_plots,
)
from zoo.eval.protocols import ALL_PROTOCOLS, PROTOCOLS, evaluate, evaluate_features
from zoo.eval.rlp import reverse_linear_probe, rlp_metrics

__all__ = [
    "ALL_PROTOCOLS",
    "PROTOCOLS",
    "ari",
    "cluster_accuracy",
    "cluster_metrics",
    "confidence_interval",
    "contingency",
    "evaluate",
    "evaluate_features",
    "evaluate_longtail",
    "extract_features",
    "fewshot_eval",
    "hungarian_match",
    "kmeans",
    "kmeans_metrics",
    "knn_predict",
    "knn_top1",
    "linear_probe",
    "nearest_centroid_accuracy",
    "nmi",
    "plot_cluster_gallery",
    "plot_confusion",
    "plot_embedding_2d",
    "plot_training_curves",
    "reverse_linear_probe",
    "rlp_metrics",
    "sample_episodes",
    "shot_accuracy",
    "write_eval_plots",
]
