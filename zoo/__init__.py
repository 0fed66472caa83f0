"""selfsup-zoo: pretrained self-supervised and clustering-based image encoders.

>>> import zoo
>>> model = zoo.create_model("simclr_convnet_mnist5k", pretrained=True)
>>> features = model.embed(images)  # [B, D], L2-normalised
>>> clip = zoo.create_model("clip_vitb32_openai", pretrained=True)  # downloads once, then offline
>>> text = clip.embed_text(["a photo of a dog"])  # [N, D] in the image embeddings' space
"""

from zoo.checkpoint import CheckpointError, load_model_folder, save_model_folder
from zoo.clip import ClipModel
from zoo.hub import publish
from zoo.model import ZooModel
from zoo.registry import (
    ModelEntry,
    create_model,
    get_entry,
    list_models,
    model_info,
    register_model,
    resolve_model,
)

__version__ = "0.1.0"


def load(name_or_folder: str) -> ZooModel:
    """Load a pretrained model: a registered name, a local model folder, or a Hub repo id ``ORG/NAME``."""
    from pathlib import Path

    if Path(name_or_folder).is_dir() or name_or_folder.startswith("hf-hub:"):
        return create_model(name_or_folder)
    if name_or_folder in list_models():
        return create_model(name_or_folder, pretrained=True)
    if "/" in name_or_folder:
        return create_model("hf-hub:" + name_or_folder)
    return create_model(name_or_folder, pretrained=True)


__all__ = [
    "CheckpointError",
    "ClipModel",
    "ModelEntry",
    "ZooModel",
    "create_model",
    "get_entry",
    "list_models",
    "load",
    "load_model_folder",
    "model_info",
    "publish",
    "register_model",
    "resolve_model",
    "save_model_folder",
]
