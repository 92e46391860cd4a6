"""Image classification inputs: image files named in a split, preprocessed by the model's own
image processor (preprocessor_config.json) into batches of `pixel_values`."""

from __future__ import annotations

from pathlib import Path

import torch

from mergetool.core.errors import DataError, MergetoolError
from mergetool.evaluation.data import iter_records
from mergetool.recipe.schema import DataSplit

PROCESSOR_FILE = "preprocessor_config.json"


def processor_dir(*dirs: Path) -> Path:
    """The first folder holding an image processor config (the task model's own, then the base's)."""
    for d in dirs:
        if d is not None and (Path(d) / PROCESSOR_FILE).is_file():
            return Path(d)
    raise MergetoolError(f"no {PROCESSOR_FILE} in {', '.join(str(d) for d in dirs if d)}", key="models",
                         fix="save the image processor next to the fine-tune (image_processor.save_pretrained)")


def load_processor(path: Path):
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(str(path))


def image_path(spec: DataSplit, value) -> Path:
    """An image column value: a path relative to the data file's folder (or absolute)."""
    return Path(spec.path).parent / str(value)


def read_image(spec: DataSplit, value, *, key: str, row: int):
    from PIL import Image, UnidentifiedImageError

    path = image_path(spec, value)
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise DataError(f"row {row}: image {str(path)!r} does not exist", file=spec.path, key=f"{key}.image",
                        fix="image paths are relative to the data file's folder") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"row {row}: cannot read image {str(path)!r}: {type(exc).__name__}", file=spec.path,
                        key=f"{key}.image", fix="use PNG, JPEG or another format Pillow reads") from None


def check_images(spec: DataSplit, key: str) -> list[DataError]:
    """For `mergetool validate`: the split names an image column and every image file exists."""
    if not spec.image:
        return [DataError("an image task's split needs an `image` column", file=spec.path, key=key,
                          fix="add `image: <column>` to the split")]
    for line, rec in iter_records(spec.path, key=key):
        path = image_path(spec, rec.get(spec.image))
        if not path.is_file():
            return [DataError(f"image {str(path)!r} does not exist", file=spec.path, key=f"{key}.image", line=line,
                              fix="image paths are relative to the data file's folder")]
    return []


def image_batches(records: list[dict], spec: DataSplit, processor, *, batch_size: int, key: str) -> list[dict]:
    """`pixel_values` batches in record order; images are opened one batch at a time."""
    batches = []
    for start in range(0, len(records), batch_size):
        chunk = records[start:start + batch_size]
        images = [read_image(spec, r[spec.image], key=key, row=start + i + 1) for i, r in enumerate(chunk)]
        pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        batches.append({"pixel_values": torch.as_tensor(pixels)})
    return batches
