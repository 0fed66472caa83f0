"""One registry of named models, each with its pretrained config (timm style).

``create_model(name, pretrained=False, **overrides)`` accepts a registered name, a local model
folder, or ``hf-hub:ORG/NAME``. A pretrained config records input size, mean/std, crop
fraction, embedding dim, method, dataset, license, weights source and measured metrics.

Weights sources:

- ``package:<folder>``: shipped inside the package (``zoo/weights/<folder>``).
- ``url:<URL>``: an official checkpoint, downloaded on first use into the torch hub cache
  (``torch.hub.get_dir()/checkpoints/<file>``), converted once by :func:`zoo.convert.convert`
  into a model folder in the zoo cache (``$ZOO_CACHE/models/<name>``, default
  ``~/.cache/selfsup-zoo/models/<name>``) and loaded from there (offline) afterwards.
"""

from __future__ import annotations

import copy
import difflib
import fnmatch
import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from zoo.checkpoint import (
    CARD_NAME,
    CONFIG_NAME,
    WEIGHTS_NAME,
    CheckpointError,
    atomic_write_text,
    load_model_folder,
    read_config,
)
from zoo.model import ZooModel, model_class

WEIGHTS_DIR = Path(__file__).parent / "weights"

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class ModelEntry:
    """A registered model: its architecture and the pretrained config that goes with its weights."""

    name: str
    arch: str
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    method: str | None = None
    dataset: str | None = None
    input_size: tuple[int, int, int] = (3, 224, 224)
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    crop_pct: float = 0.875
    interpolation: str = "bilinear"
    num_clusters: int | None = None
    license: str | None = None
    # "package:<folder under zoo/weights>", "url:<official checkpoint URL>", or None (architecture only)
    weights: str | None = None
    recipe: str | None = None
    description: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    convert_format: str | None = None  # zoo.convert format of a url: checkpoint ("moco", "swav", "sela_v2", "dino")
    source_url: str | None = None  # where the weights come from (paper / official repository / file)
    # file name in the torch hub cache when the URL's path does not name the file (Google Drive links)
    checkpoint_name: str | None = None

    def pretrained_cfg(self) -> dict[str, Any]:
        cfg = asdict(self)
        cfg["architecture"] = cfg.pop("arch")
        cfg["weights_source"] = cfg.pop("weights")
        cfg["input_size"] = list(self.input_size)
        cfg["mean"], cfg["std"] = list(self.mean), list(self.std)
        return cfg


_REGISTRY: dict[str, ModelEntry] = {}


class UnknownModelError(KeyError):
    """An unregistered model name; the message lists the closest registered names."""

    def __str__(self) -> str:  # KeyError would print the message with quotes around it
        return str(self.args[0])


def register_model(entry: ModelEntry, overwrite: bool = False) -> ModelEntry:
    if entry.name in _REGISTRY and not overwrite:
        raise ValueError(f"model {entry.name!r} is already registered")
    _REGISTRY[entry.name] = entry
    return entry


def list_models(pattern: str | None = None, pretrained: bool = False) -> list[str]:
    """Registered names, optionally filtered by a shell-style ``pattern`` (``"simclr_*"``)."""
    names = sorted(n for n, e in _REGISTRY.items() if not pretrained or e.weights)
    return [n for n in names if pattern is None or fnmatch.fnmatch(n, pattern)]


def get_entry(name: str) -> ModelEntry:
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=5, cutoff=0.4)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise UnknownModelError(f"unknown model {name!r}{hint} (zoo.list_models() lists {len(_REGISTRY)} models)")
    return _REGISTRY[name]


def pretrained_folder(entry: ModelEntry) -> Path:
    """The model folder holding ``entry``'s weights; for a ``url:`` entry, fetched and converted on first use."""
    if not entry.weights:
        raise ValueError(f"model {entry.name!r} has no pretrained weights; use pretrained=False")
    kind, _, where = entry.weights.partition(":")
    if kind == "package":
        return WEIGHTS_DIR / where
    if kind == "url":
        return _url_folder(entry, where)
    raise ValueError(f"model {entry.name!r}: unsupported weights source {entry.weights!r}")


def zoo_cache_dir() -> Path:
    """Where converted official checkpoints live: ``$ZOO_CACHE/models`` (default ``~/.cache/selfsup-zoo/models``)."""
    root = os.environ.get("ZOO_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "selfsup-zoo")
    return Path(root) / "models"


def hub_checkpoint_path(url: str, file_name: str | None = None) -> Path:
    """Where torch.hub keeps a downloaded file: ``torch.hub.get_dir()/checkpoints/<file name>``.

    The file name is the URL's last path component unless ``file_name`` is given.
    """
    from urllib.parse import urlparse

    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints" / (file_name or os.path.basename(urlparse(url).path))


def _url_folder(entry: ModelEntry, url: str) -> Path:
    folder = zoo_cache_dir() / entry.name
    if (folder / CONFIG_NAME).is_file() and (folder / WEIGHTS_NAME).is_file():
        arch = read_config(folder).get("architecture")
        if arch != entry.arch:
            raise CheckpointError(
                f"{folder}: cached model folder has architecture {arch!r}, but {entry.name!r} is {entry.arch!r}; "
                f"delete the folder to convert the official checkpoint again"
            )
        return folder
    checkpoint = hub_checkpoint_path(url, entry.checkpoint_name)
    if not checkpoint.is_file():
        import torch.hub

        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        try:
            # writes to a temporary file and renames it into place when complete
            torch.hub.download_url_to_file(url, str(checkpoint), progress=True)
        except Exception as exc:  # no network, DNS failure, HTTP error, proxy ...
            raise FileNotFoundError(_missing_message(entry, url, checkpoint, folder, exc)) from exc
    _convert_into(entry, checkpoint, folder)
    return folder


def _missing_message(entry: ModelEntry, url: str, checkpoint: Path, folder: Path, exc: Exception) -> str:
    return (
        f"pretrained weights of {entry.name!r} are not available offline and downloading them failed "
        f"({type(exc).__name__}: {exc}). "
        f"Download {url} and place the file at {checkpoint} (torch.hub.get_dir()/checkpoints/), "
        f"or place an already converted model folder at {folder} ($ZOO_CACHE/models/{entry.name}); "
        f"then call create_model({entry.name!r}, pretrained=True) again"
    )


def _convert_into(entry: ModelEntry, checkpoint: Path, folder: Path) -> None:
    """Convert an official checkpoint into ``folder`` (a temporary sibling renamed into place)."""
    import importlib

    convert = importlib.import_module("zoo.convert").convert  # lazy: importers are only needed once per model
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.converting-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        convert(
            str(checkpoint),
            fmt=entry.convert_format or "auto",
            out=str(tmp),
            arch=entry.arch,
            arch_kwargs=dict(entry.arch_kwargs),
            name=entry.name,
        )
        config = read_config(tmp)
        if config.get("architecture") != entry.arch:
            raise CheckpointError(
                f"{checkpoint}: converted to architecture {config.get('architecture')!r}, expected {entry.arch!r}"
            )
        # The folder documents where it came from: the registry's preprocessing, licence and published metrics.
        from zoo.hub import render_model_card

        keep = {"architecture", "arch_kwargs", "embed_dim", "num_clusters", "num_cluster_heads", "format_version"}
        config.update({k: v for k, v in entry.pretrained_cfg().items() if k not in keep})
        config["checkpoint_file"] = checkpoint.name
        atomic_write_text(tmp / CONFIG_NAME, json.dumps(config, indent=2, sort_keys=True) + "\n")
        atomic_write_text(tmp / CARD_NAME, render_model_card(config))
        load_model_folder(tmp)  # never leave a folder in the cache that does not load
        try:
            os.replace(tmp, folder)
        except OSError:
            if not (folder / WEIGHTS_NAME).is_file():  # not another process that finished first
                shutil.rmtree(folder, ignore_errors=True)
                os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def create_model(name: str, pretrained: bool = False, **overrides: Any) -> ZooModel:
    """Build a model by registered name, local folder path or ``hf-hub:ORG/NAME``.

    ``overrides`` change architecture arguments (``cifar_stem=True``) or ``num_clusters`` for a
    freshly initialised model; a pretrained model's architecture is fixed by its weights.
    """
    if name.startswith("hf-hub:"):
        from zoo.hub import download_folder

        return _with_overrides(load_model_folder(download_folder(name[len("hf-hub:") :])), overrides)
    if Path(name).is_dir() and (Path(name) / CONFIG_NAME).is_file():
        return _with_overrides(load_model_folder(name), overrides)
    entry = get_entry(name)
    if pretrained:
        model = load_model_folder(pretrained_folder(entry))
        # The registry's entry is the source of truth for name/licence/metrics of shipped weights.
        model.pretrained_cfg.update({k: v for k, v in entry.pretrained_cfg().items() if k != "arch_kwargs"})
        return _with_overrides(model, overrides)
    arch_kwargs = {**entry.arch_kwargs, **{k: v for k, v in overrides.items() if k != "num_clusters"}}
    cfg = entry.pretrained_cfg()
    cfg["weights_source"] = None
    cfg["metrics"] = {}
    return model_class(entry.arch)(
        entry.arch,
        arch_kwargs=arch_kwargs,
        num_clusters=overrides.get("num_clusters", entry.num_clusters),
        pretrained_cfg=cfg,
    )


def resolve_model(spec: str | os.PathLike, pretrained: bool = True) -> ZooModel:
    """A MODEL argument as the commands take it: a registered name, a local model folder or ``hf-hub:ORG/NAME``.

    A registered name loads its pretrained weights when it has some (``pretrained=False``: always a
    fresh initialisation); a folder or a Hub repo is always its saved weights. The one resolver the
    ``zoo``, ``train`` and ``serve`` commands share.
    """
    text = os.fspath(spec)
    if text.startswith("hf-hub:"):
        return create_model(text)
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / CONFIG_NAME).is_file():
            raise ValueError(f"model folder {str(path)!r} has no {CONFIG_NAME}; give a folder written by "
                             "`zoo train`, `zoo convert` or `zoo publish`, or a registered model name")
        return create_model(str(path))
    entry = get_entry(text)
    return create_model(text, pretrained=pretrained and bool(entry.weights))


def _with_overrides(model: ZooModel, overrides: dict[str, Any]) -> ZooModel:
    if overrides:
        raise ValueError(
            f"cannot override {sorted(overrides)} of a pretrained model; build it with pretrained=False instead"
        )
    return model


def model_info(name: str) -> dict[str, Any]:
    """The pretrained config of a registered model (without building it)."""
    return copy.deepcopy(get_entry(name).pretrained_cfg())


# ----------------------------------------------------------------------------- built-in entries
_MNIST = dict(input_size=(3, 28, 28), mean=(0.1307,) * 3, std=(0.3081,) * 3, crop_pct=1.0)


def _register_builtin() -> None:
    for arch, kwargs, desc in [
        ("resnet18", {}, "ResNet-18 (torchvision), random init"),
        ("resnet50", {}, "ResNet-50 (torchvision), random init"),
        ("vit_s16", {}, "ViT-S/16 (torchvision VisionTransformer), random init"),
        ("vit_b16", {}, "ViT-B/16 (torchvision), random init"),
    ]:
        register_model(ModelEntry(name=arch, arch=arch, arch_kwargs=kwargs, description=desc))
    register_model(
        ModelEntry(
            name="resnet18_cifar",
            arch="resnet18",
            arch_kwargs={"cifar_stem": True},
            input_size=(3, 32, 32),
            mean=(0.4914, 0.4822, 0.4465),
            std=(0.2470, 0.2435, 0.2616),
            crop_pct=1.0,
            description="ResNet-18 with the CIFAR stem (3x3 conv, no max-pool), random init",
        )
    )
    register_model(ModelEntry(name="convnet", arch="convnet", description="small convnet, random init", **_MNIST))
    register_model(
        ModelEntry(name="convnet_tiny", arch="convnet_tiny", description="tiny convnet for tests", **_MNIST)
    )
    # Shipped weights: every folder under zoo/weights/ with a config.json is an entry.
    for config_path in sorted(WEIGHTS_DIR.glob(f"*/{CONFIG_NAME}")):
        cfg = json.loads(config_path.read_text(encoding="utf-8"))
        register_model(
            ModelEntry(
                name=cfg["name"],
                arch=cfg["architecture"],
                arch_kwargs=cfg.get("arch_kwargs", {}),
                method=cfg.get("method"),
                dataset=cfg.get("dataset"),
                input_size=tuple(cfg["input_size"]),
                mean=tuple(cfg["mean"]),
                std=tuple(cfg["std"]),
                crop_pct=cfg.get("crop_pct", 1.0),
                interpolation=cfg.get("interpolation", "bilinear"),
                num_clusters=cfg.get("num_clusters"),
                license=cfg.get("license"),
                weights=f"package:{config_path.parent.name}",
                recipe=cfg.get("recipe"),
                description=cfg.get("description", ""),
                metrics=cfg.get("metrics", {}),
            )
        )



# Official checkpoints, downloaded and converted on first use (nothing shipped). Metrics are the
# ones the authors publish for these exact files (ImageNet-1k val top-1 on frozen features).
_IN1K = dict(dataset="imagenet-1k", input_size=(3, 224, 224), mean=IMAGENET_MEAN, std=IMAGENET_STD, crop_pct=0.875)
_PUBLISHED = "published by the authors for this checkpoint; ImageNet-1k val top-1, frozen features"
OFFICIAL_MODELS: list[dict[str, Any]] = [
    dict(
        name="moco_v2_resnet50_in1k",
        arch="resnet50",
        method="moco_v2",
        url="https://dl.fbaipublicfiles.com/moco/moco_checkpoints/moco_v2_800ep/moco_v2_800ep_pretrain.pth.tar",
        convert_format="moco",
        license="MIT",
        source_url="https://github.com/facebookresearch/moco",
        metrics={"linear_top1": 0.711},
        protocol="linear probe (MoCo v2, 800 epochs, Chen et al. 2020)",
        description="MoCo v2 ResNet-50, 800 epochs on ImageNet-1k (official checkpoint, facebookresearch/moco)",
    ),
    dict(
        name="swav_resnet50_in1k",
        arch="resnet50",
        method="swav",
        url="https://dl.fbaipublicfiles.com/deepcluster/swav_800ep_pretrain.pth.tar",
        convert_format="swav",
        license="CC BY-NC 4.0",
        source_url="https://github.com/facebookresearch/swav",
        metrics={"linear_top1": 0.753},
        protocol="linear probe (SwAV, 800 epochs, multi-crop 2x224+6x96, Caron et al. 2020)",
        description="SwAV ResNet-50, 800 epochs, multi-crop, on ImageNet-1k (official checkpoint, facebookresearch/swav)",
    ),
    dict(
        name="deepcluster_v2_resnet50_in1k",
        arch="resnet50",
        method="deepcluster_v2",
        url="https://dl.fbaipublicfiles.com/deepcluster/deepclusterv2_800ep_pretrain.pth.tar",
        convert_format="deepcluster_v2",
        license="CC BY-NC 4.0",
        source_url="https://github.com/facebookresearch/swav",
        metrics={"linear_top1": 0.752},
        protocol="linear probe (DeepCluster-v2, 800 epochs, multi-crop 2x224+6x96, SwAV paper appendix)",
        description="DeepCluster-v2 ResNet-50, 800 epochs on ImageNet-1k (official checkpoint, facebookresearch/swav)",
    ),
    dict(
        name="sela_v2_resnet50_in1k",
        arch="resnet50",
        method="sela_v2",
        url="https://dl.fbaipublicfiles.com/deepcluster/selav2_400ep_pretrain.pth.tar",
        convert_format="sela_v2",
        license="CC BY-NC 4.0",
        source_url="https://github.com/facebookresearch/swav",
        metrics={"linear_top1": 0.718},
        protocol="linear probe (SeLa-v2, 400 epochs, multi-crop 2x160+4x96, SwAV paper appendix)",
        description="SeLa-v2 ResNet-50, 400 epochs on ImageNet-1k (official checkpoint, facebookresearch/swav)",
    ),
    dict(
        name="dino_vits16_in1k",
        arch="vit_s16",
        method="dino",
        url="https://dl.fbaipublicfiles.com/dino/dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth",
        convert_format="dino",
        interpolation="bicubic",  # DINO's evaluation resizes bicubically
        license="Apache-2.0",
        source_url="https://github.com/facebookresearch/dino",
        metrics={"linear_top1": 0.770, "knn_top1": 0.745},
        protocol="linear probe and weighted 20-NN (DINO, Caron et al. 2021)",
        description="DINO ViT-S/16 on ImageNet-1k, teacher backbone (official checkpoint, facebookresearch/dino)",
    ),
    dict(
        name="dino_vitb16_in1k",
        arch="vit_b16",
        method="dino",
        url="https://dl.fbaipublicfiles.com/dino/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth",
        convert_format="dino",
        interpolation="bicubic",  # DINO's evaluation resizes bicubically
        license="Apache-2.0",
        source_url="https://github.com/facebookresearch/dino",
        metrics={"linear_top1": 0.782, "knn_top1": 0.761},
        protocol="linear probe and weighted 20-NN (DINO, Caron et al. 2021)",
        description="DINO ViT-B/16 on ImageNet-1k, teacher backbone (official checkpoint, facebookresearch/dino)",
    ),
]



# SCAN's releases (wvangansbeke/Unsupervised-Classification) are Google Drive files: the direct
# download endpoint with the virus-scan confirmation skipped; the hub cache file is named per entry.
def _gdrive(file_id: str) -> str:
    return f"https://drive.usercontent.google.com/download?id={file_id}&export=download&confirm=t"


_SCAN_PUBLISHED = "published by the SCAN authors for this checkpoint (best model of the paper's runs); test split"
_CIFAR10_PRE = dict(dataset="cifar10", input_size=(3, 32, 32), mean=(0.4914, 0.4822, 0.4465),
                    std=(0.2023, 0.1994, 0.2010), crop_pct=1.0)
# configs/scan/scan_cifar20.yml (transformation_kwargs.normalize)
_CIFAR20_PRE = dict(dataset="cifar100-20", input_size=(3, 32, 32), mean=(0.5071, 0.4867, 0.4408),
                    std=(0.2675, 0.2565, 0.2761), crop_pct=1.0)
def _scan_entries() -> list[dict[str, Any]]:
    entries = []
    for data, pre, k, runs in [
        ("cifar10", _CIFAR10_PRE, 10, [("scan", "1v6b6jJY5M4-duSqWpGFmdf9e9T3dPrx0", (0.816, 0.715, 0.665)),
                                       ("selflabel", "18gITFzAbQsGS5vt8hyi5HjbeRDsVLihw", (0.883, 0.797, 0.772))]),
        ("cifar20", _CIFAR20_PRE, 20, [("scan", "1pPCi1QG05kP_JdoX29dxEhVddIRk68Sd", (0.440, 0.449, 0.283)),
                                       ("selflabel", "11mEmpDMyq63pM4kmDy6ItHouI6Q__uB7", (0.507, 0.486, 0.333))]),
    ]:
        for step, file_id, (acc, nmi, ari) in runs:
            name = f"scan_{'selflabel_' if step == 'selflabel' else ''}resnet18_{data}"
            stage = "self-labelling step" if step == "selflabel" else "SCAN-loss step"
            entries.append(dict(
                name=name,
                arch="resnet18",
                # SCAN's CIFAR ResNet-18 (resnet_cifar.py): no max-pool after the 3x3 stem, unlike its STL-10 one
                arch_kwargs={"cifar_stem": True, "stem_pool": False},
                method="scan",
                url=_gdrive(file_id),
                checkpoint_name=f"{name}.pth.tar",
                convert_format="scan",
                license="CC BY-NC 4.0",
                num_clusters=k,
                preprocess=pre,
                source_url="https://github.com/wvangansbeke/Unsupervised-Classification",
                metrics={"head_acc": acc, "head_nmi": nmi, "head_ari": ari},
                protocol=f"cluster head ACC/NMI/ARI with Hungarian matching, {pre['dataset']} test",
                published=_SCAN_PUBLISHED,
                description=(f"SCAN ResNet-18 (CIFAR stem) on {pre['dataset']}, after the {stage}: predicts {k} "
                             f"clusters (official checkpoint, wvangansbeke/Unsupervised-Classification)"),
            ))
    return entries


OFFICIAL_MODELS += _scan_entries()


def _register_official() -> None:
    for spec in OFFICIAL_MODELS:
        spec = dict(spec)
        url, protocol = spec.pop("url"), spec.pop("protocol")
        preprocess, published = spec.pop("preprocess", _IN1K), spec.pop("published", _PUBLISHED)
        split = "test" if preprocess is not _IN1K else "validation"
        metrics = {**spec.pop("metrics"), "split": split, "protocol": f"{protocol}; {published}"}
        register_model(ModelEntry(**spec, **preprocess, weights=f"url:{url}", metrics=metrics))


# CLIP (image-text) releases through open_clip. OpenAI's files are TorchScript archives, read without
# running them (zoo.convert.clip); LAION's is an open_clip safetensors state dict on the Hugging Face Hub.
# Zero-shot ImageNet-1k top-1 as open_clip publishes it (docs/openclip_results.csv, CLIP_benchmark,
# OpenAI's 80 prompt templates), which agrees with the CLIP paper for the OpenAI models.
_CLIP_PRE = dict(input_size=(3, 224, 224), mean=(0.48145466, 0.4578275, 0.40821073),
                 std=(0.26862954, 0.26130258, 0.27577711), crop_pct=1.0, interpolation="bicubic")
_CLIP_PUBLISHED = ("published in open_clip's results table (docs/openclip_results.csv, CLIP_benchmark) for these "
                   "weights; ImageNet-1k val, zero-shot with the CLIP paper's 80 prompt templates")
_OPENAI_CLIP = "https://openaipublic.azureedge.net/clip/models"
CLIP_MODELS: list[dict[str, Any]] = [
    dict(name="clip_rn50_openai", model_name="RN50-quickgelu", fmt="openai_clip", top1=0.5982, data="WIT-400M",
         url=f"{_OPENAI_CLIP}/afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762/RN50.pt",
         license="MIT", source_url="https://github.com/openai/CLIP",
         description="OpenAI CLIP ResNet-50 (attention pooling), image and text towers (official release)"),
    dict(name="clip_vitb32_openai", model_name="ViT-B-32-quickgelu", fmt="openai_clip", top1=0.6332, data="WIT-400M",
         url=f"{_OPENAI_CLIP}/40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt",
         license="MIT", source_url="https://github.com/openai/CLIP",
         description="OpenAI CLIP ViT-B/32, image and text towers (official release)"),
    dict(name="clip_vitb16_openai", model_name="ViT-B-16-quickgelu", fmt="openai_clip", top1=0.6834, data="WIT-400M",
         url=f"{_OPENAI_CLIP}/5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt",
         license="MIT", source_url="https://github.com/openai/CLIP",
         description="OpenAI CLIP ViT-B/16, image and text towers (official release)"),
    dict(name="clip_vitb32_laion2b", model_name="ViT-B-32", fmt="open_clip", top1=0.6656, data="LAION-2B",
         url="https://huggingface.co/laion/CLIP-ViT-B-32-laion2B-s34B-b79K/resolve/main/open_clip_model.safetensors",
         checkpoint_name="clip_vitb32_laion2b_s34b_b79k.safetensors", license="MIT",
         source_url="https://huggingface.co/laion/CLIP-ViT-B-32-laion2B-s34B-b79K",
         description="OpenCLIP ViT-B/32 trained on LAION-2B (laion2b_s34b_b79k), image and text towers"),
]


def _register_clip() -> None:
    for spec in CLIP_MODELS:
        register_model(ModelEntry(
            name=spec["name"], arch="open_clip", arch_kwargs={"model_name": spec["model_name"]}, method="clip",
            dataset=spec["data"], license=spec["license"], weights=f"url:{spec['url']}", description=spec["description"],
            metrics={"zeroshot_top1": spec["top1"], "split": "validation", "data": "imagenet-1k",
                     "protocol": _CLIP_PUBLISHED},
            convert_format=spec["fmt"], source_url=spec["source_url"], checkpoint_name=spec.get("checkpoint_name"),
            **_CLIP_PRE,
        ))


_register_builtin()
_register_official()
_register_clip()
