"""``imagefolder``: any folder of images, labelled by class subfolder when it is laid out that way.

Files are found recursively (jpg, jpeg, png, bmp, gif, webp, tif, tiff; case-insensitive; hidden
files and folders skipped) and sorted. When every image lies inside an immediate subfolder of the
root, the subfolders are the classes (sorted names, like torchvision's ``ImageFolder``) and labels
are their indices; otherwise labels are ``-1`` and ``classes`` is empty. Unreadable files are
found at construction (PIL open + verify, or a full decode with ``full_check=True``), reported
with one warning and skipped (``.skipped``).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from PIL import Image

from zoo.data.base import Transform, ZooDataset

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def find_images(root: str | os.PathLike) -> list[Path]:
    """Image files under ``root`` (recursive, by extension, hidden entries skipped), sorted by path."""
    root = Path(root)
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fn in filenames:
            if not fn.startswith(".") and fn.lower().endswith(IMG_EXTENSIONS):
                found.append(Path(dirpath) / fn)
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def check_image(path: str | os.PathLike, full: bool = False) -> str | None:
    """``None`` when PIL can read the file, else the reason (``full=True`` decodes all pixels)."""
    try:
        with Image.open(path) as im:
            im.verify()
        if full:
            with Image.open(path) as im:
                im.load()
    except Exception as e:  # noqa: BLE001 - any decoder failure means "unreadable"
        return f"{type(e).__name__}: {e}"
    return None


class ImageFolderDataset(ZooDataset):
    """Images from a folder; ``.paths`` are the readable files, ``.skipped`` the unreadable ones."""

    def __init__(
        self, root: str | os.PathLike, split: str, transform: Transform | None, full_check: bool = False,
        progress: bool = False,
    ):
        root_path = Path(root).expanduser()
        if not root_path.is_dir():
            raise ValueError(f"imagefolder root {str(root_path)!r} is not a directory")
        candidates = find_images(root_path)
        rel_parts = [p.relative_to(root_path).parts for p in candidates]
        labelled = bool(candidates) and all(len(parts) >= 2 for parts in rel_parts)
        classes = sorted({parts[0] for parts in rel_parts}) if labelled else []
        class_index = {c: i for i, c in enumerate(classes)}

        paths: list[str] = []
        targets: list[int] = []
        skipped: list[str] = []
        reasons: dict[str, str] = {}
        from tqdm.auto import tqdm

        # A full check decodes every file, as long as embedding them: show it when asked.
        checking = tqdm(zip(candidates, rel_parts), total=len(candidates), desc="checking images",
                        disable=not progress, leave=False)
        for p, parts in checking:
            reason = check_image(p, full=full_check)
            if reason is not None:
                skipped.append(str(p))
                reasons[str(p)] = reason
                continue
            paths.append(str(p))
            targets.append(class_index[parts[0]] if labelled else -1)
        if skipped:
            shown = "; ".join(f"{s} ({reasons[s]})" for s in skipped[:5])
            more = f" and {len(skipped) - 5} more" if len(skipped) > 5 else ""
            warnings.warn(
                f"imagefolder {str(root_path)!r}: skipped {len(skipped)} unreadable image file(s): {shown}{more}",
                stacklevel=3,
            )
        if not paths:
            raise ValueError(
                f"no readable images in {str(root_path)!r} (looked recursively for {', '.join(IMG_EXTENSIONS)};"
                f" {len(skipped)} unreadable)"
            )
        super().__init__("imagefolder", split, targets, classes, transform)
        self.root = str(root_path)
        self.paths = paths
        self.skipped = skipped

    def get_pil(self, i: int) -> Image.Image:
        path = self.paths[self._index(i)]
        try:
            with Image.open(path) as im:
                im.load()
                return im
        except Exception as e:  # noqa: BLE001
            raise OSError(f"cannot read image {path!r}: {type(e).__name__}: {e}") from e
