"""Model cards (YAML metadata + metrics table) for model folders.

The card's front matter follows the Hugging Face Hub's model-card metadata (``library_name``,
``tags``, ``license``, ``datasets``, ``model-index``) so the Hub shows the metrics.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import yaml

from zoo.checkpoint import atomic_write, atomic_write_text

LIBRARY_NAME = "selfsup-zoo"

METRIC_NAMES = {
    "knn_top1": "kNN top-1",
    "linear_top1": "linear probe top-1",
    "kmeans_acc": "k-means ACC",
    "kmeans_nmi": "k-means NMI",
    "kmeans_ari": "k-means ARI",
    "head_acc": "cluster head ACC",
    "head_nmi": "cluster head NMI",
    "head_ari": "cluster head ARI",
    "zeroshot_top1": "zero-shot top-1",
    "zeroshot_top5": "zero-shot top-5",
    "t2i_recall@10": "text-to-image recall@10",
}


def card_metadata(config: dict[str, Any]) -> dict[str, Any]:
    """The model card's YAML front matter, in the Hub's format (``huggingface_hub.ModelCardData`` parses it)."""
    raw_metrics = config.get("metrics") or {}
    metrics = _numeric_metrics(raw_metrics)
    dataset = config.get("dataset") or "unknown"
    tags = ["image-feature-extraction", "self-supervised", config.get("method") or "untrained", config["architecture"]]
    meta: dict[str, Any] = {"library_name": LIBRARY_NAME}
    meta.update(_hub_license(config.get("license")))
    meta.update(
        {
            "tags": list(dict.fromkeys(str(t) for t in tags)),  # unique, in order
            "datasets": [dataset],
            "pipeline_tag": "image-feature-extraction",
        }
    )
    if metrics:
        result: dict[str, Any] = {
            "task": {"type": "image-classification", "name": "Image Classification"},
            "dataset": {"name": dataset, "type": dataset, "split": str(raw_metrics.get("split", "test"))},
            "metrics": [
                {"type": key, "name": METRIC_NAMES.get(key, key), "value": value} for key, value in metrics.items()
            ],
        }
        if config.get("source_url"):
            result["source"] = {"name": "published by the authors", "url": config["source_url"]}
        meta["model-index"] = [{"name": config.get("name", config["architecture"]), "results": [result]}]
    return meta


def _numeric_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    return {
        k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
    }


# Hub licence identifiers (https://huggingface.co/docs/hub/repositories-licenses) for the names the zoo uses.
_HUB_LICENSES = {
    "cc-by-nc-4.0": "cc-by-nc-4.0",
    "cc by-nc 4.0": "cc-by-nc-4.0",
    "cc-by-4.0": "cc-by-4.0",
    "cc by 4.0": "cc-by-4.0",
    "cc-by-sa-4.0": "cc-by-sa-4.0",
    "mit": "mit",
    "apache-2.0": "apache-2.0",
    "apache 2.0": "apache-2.0",
    "bsd-3-clause": "bsd-3-clause",
    "bsd-2-clause": "bsd-2-clause",
    "gpl-3.0": "gpl-3.0",
    "cc0-1.0": "cc0-1.0",
}


def _hub_license(license_name: str | None) -> dict[str, str]:
    """``{"license": id}`` for a licence the Hub knows; else ``license: other`` plus its name, as the Hub asks."""
    if not license_name:
        return {"license": "other"}
    hub_id = _HUB_LICENSES.get(license_name.strip().lower())
    if hub_id:
        return {"license": hub_id}
    return {"license": "other", "license_name": license_name.strip().lower().replace(" ", "-")}


def render_model_card(config: dict[str, Any], repo_id: str | None = None) -> str:
    """A README.md: YAML front matter, what the model is, its preprocessing and its metrics table.

    ``repo_id`` (``ORG/NAME``): the card is for that Hub repository, and its usage snippet loads it from there.
    """
    meta = yaml.safe_dump(card_metadata(config), sort_keys=False)
    name = config.get("name", config["architecture"])

    def v(key: str) -> Any:
        value = config.get(key)
        return "-" if value in (None, "", {}) else value

    lines = [
        "---",
        meta.rstrip(),
        "---",
        "",
        f"# {name}",
        "",
        f"{config.get('description') or 'A ' + (config.get('method') or 'self-supervised') + ' encoder.'}",
        "",
        "| field | value |",
        "|---|---|",
        f"| architecture | `{config['architecture']}` {config.get('arch_kwargs') or ''} |",
        f"| method | {v('method')} |",
        f"| training data | {v('dataset')} |",
        f"| embedding dim | {v('embed_dim')} |",
        f"| input size | {v('input_size')} |",
        f"| mean / std | {v('mean')} / {v('std')} |",
        f"| crop fraction | {v('crop_pct')} |",
        f"| clusters | {v('num_clusters')} |",
        f"| license | {v('license')} |",
        f"| recipe | {v('recipe')} |",
        "",
        "## Metrics",
        "",
    ]
    metrics = _numeric_metrics(config.get("metrics") or {})
    if metrics:
        lines += ["| metric | value |", "|---|---|"]
        lines += [f"| {METRIC_NAMES.get(k, k)} (`{k}`) | {v:.4f} |" for k, v in metrics.items()]
        if (config.get("metrics") or {}).get("protocol"):
            lines += ["", f"Protocol: {config['metrics']['protocol']}"]
        if config.get("source_url"):
            lines += ["", f"Source: {config['source_url']}"]
    else:
        lines.append("Not evaluated yet: run `zoo eval` on this folder.")
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "import zoo",
        f'model = zoo.load("{repo_id or name}")  # a registered name, a model folder, or ORG/NAME on the Hub',
        "features = model.embed(images)  # [B, D], L2-normalised",
        "```",
        "",
    ]
    if repo_id:
        lines += [f'Also `zoo.create_model("hf-hub:{repo_id}")`, and `zoo eval hf-hub:{repo_id}` on the command line.', ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- publishing
PUBLISHED_FILES = ("model.safetensors", "config.json", "README.md")  # what a model folder needs on the Hub
OPTIONAL_FILES = ("model.onnx",)  # uploaded too when the folder has them; not needed to load


def publish(
    folder: str | os.PathLike,
    repo_id: str,
    token: str | None = None,
    private: bool = False,
    commit_message: str | None = None,
    target: str | os.PathLike | None = None,
) -> str:
    """Publish a model folder to the Hugging Face Hub as ``repo_id`` (``ORG/NAME``); returns the repo's URL.

    The folder must load (:func:`zoo.checkpoint.load_model_folder`): a broken folder is refused before
    anything is uploaded. Its model card is regenerated from ``config.json`` (metrics in the Hub's
    ``model-index`` format). ``token``: a Hub token; ``None`` uses ``HF_TOKEN`` or the stored login.

    ``target``: a local directory. Instead of uploading, write there exactly the files that would be
    uploaded (a dry run); returns the directory. ``zoo.load(target)`` reads it back.
    """
    from zoo.checkpoint import CARD_NAME, CheckpointError, load_model_folder, read_config

    folder = Path(folder)
    _validate_repo_id(repo_id)
    try:
        load_model_folder(folder)
    except CheckpointError as exc:
        raise CheckpointError(f"refusing to publish {folder}: {exc}") from exc
    config = read_config(folder)
    card = render_model_card(config, repo_id=repo_id)

    def stage(into: Path) -> list[str]:
        into.mkdir(parents=True, exist_ok=True)
        names = list(PUBLISHED_FILES) + [n for n in OPTIONAL_FILES if (folder / n).is_file()]
        for name in names:
            if name == CARD_NAME:
                atomic_write_text(into / name, card)
            elif (folder / name).resolve() != (into / name).resolve():
                source = folder / name
                atomic_write(into / name, lambda tmp, source=source: shutil.copyfile(source, tmp))
        return names

    if target is not None:
        target = Path(target)
        if target.resolve() == folder.resolve():
            raise ValueError(f"target {target} is the folder being published; choose another directory")
        stage(target)
        load_model_folder(target)  # what was written loads back
        return str(target)

    from huggingface_hub import HfApi

    api = HfApi(token=token)
    url = api.create_repo(repo_id, exist_ok=True, private=private, repo_type="model")
    name = config.get("name", config["architecture"])
    with tempfile.TemporaryDirectory(prefix="zoo-publish-") as tmp:
        names = stage(Path(tmp))
        api.upload_folder(
            repo_id=repo_id,
            repo_type="model",
            folder_path=tmp,
            allow_patterns=names,
            commit_message=commit_message or f"Upload {name} ({config['architecture']}) with {LIBRARY_NAME}",
        )
    return str(url)


def _validate_repo_id(repo_id: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise ValueError(f"invalid Hub repo id {repo_id!r} (expected ORG/NAME): {exc}") from exc


# ----------------------------------------------------------------------------- loading
def hub_cache_dir() -> str | None:
    """The Hugging Face cache as the environment says *now* (``HF_HUB_CACHE``, else ``$HF_HOME/hub``).

    huggingface_hub reads these variables once, at import; reading them per call lets a process
    (or a test) point at another cache later. ``None``: huggingface_hub's default.
    """
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    return None


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "on", "yes", "true"}


def download_folder(repo_id: str, revision: str | None = None, cache_dir: str | os.PathLike | None = None) -> str:
    """Fetch a published model folder from the Hugging Face Hub (or its local cache when offline).

    ``HF_HUB_OFFLINE=1`` reads the cache only. Only the files a model folder needs are fetched.
    ``cache_dir``: the Hugging Face cache (default: ``HF_HUB_CACHE`` / ``HF_HOME`` read at call time).
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    _validate_repo_id(repo_id)
    cache_dir = cache_dir if cache_dir is not None else hub_cache_dir()
    try:
        return snapshot_download(
            repo_id,
            revision=revision,
            allow_patterns=list(PUBLISHED_FILES),
            cache_dir=None if cache_dir is None else str(cache_dir),
            local_files_only=_offline(),
        )
    except LocalEntryNotFoundError as exc:
        where = cache_dir or "the default Hugging Face cache"
        raise FileNotFoundError(
            f"hf-hub:{repo_id} is not in the local Hugging Face cache ({where}) and the Hub cannot be reached"
            f"{' (HF_HUB_OFFLINE=1)' if _offline() else ''}: {exc}"
        ) from exc
