"""The image lists a proposal store is filled from: a VOC split, a COCO split or an image folder."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from detect.data.coco import COCODataset
from detect.data.folder import list_images
from detect.data.records import ImageRecord
from detect.data.voc import VOCDataset
from detect.errors import DatasetError


@dataclass
class ImageSource:
    """Images of one split, with ground truth where the format has it.

    Attributes:
        name: the split's key in the proposal store, e.g. ``"bccd-test"``.
        items: (image_id, image path) in the split's order.
        records: annotated records (VOC, COCO), or None for a bare image folder.
        class_names: label i is ``class_names[i]``.
    """

    name: str
    items: list[tuple[str, Path]]
    records: list[ImageRecord] | None = None
    class_names: list[str] = field(default_factory=list)

    def limit(self, count: int | None) -> "ImageSource":
        """The first ``count`` images only (for quick trials); None or <=0 keeps all."""
        if not count or count <= 0:
            return self
        records = self.records[:count] if self.records is not None else None
        return ImageSource(self.name, self.items[:count], records, self.class_names)


def split_key(*parts: str) -> str:
    """The store's folder name for a split, e.g. ``split_key("bccd", "test") == "bccd-test"``."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", "-".join(p for p in parts if p)).strip("._") or "split"




def voc_source(root: str | Path, split: str, *, name: str | None = None) -> ImageSource:
    """A VOC split (classes discovered from its annotations)."""
    data = VOCDataset(root, split, classes="auto")
    items = [(r.image_id, Path(r.path)) for r in data.records]
    return ImageSource(name or split_key(Path(root).resolve().name, split), items, data.records, data.class_names)


def coco_source(annotations: str | Path, images: str | Path, *, name: str | None = None) -> ImageSource:
    """A COCO split: instances JSON plus the folder its ``file_name`` entries are relative to."""
    data = COCODataset(annotations, images)
    items = [(r.image_id, Path(r.path)) for r in data.records]
    return ImageSource(name or split_key(Path(annotations).stem), items, data.records, data.class_names)


def folder_source(folder: str | Path, *, name: str | None = None) -> ImageSource:
    """Every image under a folder; the id is the path relative to it, without the extension."""
    folder = Path(folder)
    paths = list_images(folder)
    ids = [p.relative_to(folder).with_suffix("").as_posix() for p in paths]
    if len(set(ids)) != len(ids):
        seen: set[str] = set()
        clash = next(i for i in ids if i in seen or seen.add(i))
        raise DatasetError(f"{folder}: two images share the id '{clash}' (same name, different extension)")
    return ImageSource(name or split_key(folder.resolve().name), list(zip(ids, paths)))
