"""A user's own labelled images: image files plus a CSV of crystal positions -> `LabelledImage`s.

CSV (header required, extra columns ignored):

```
image,row_px,col_px,radius_px,diffracts
tile_001.tif,512.5,300.0,12,1
tile_001.tif,80,944,,
tile_002.mrc,10,20,6,0
```

- `image`: the file name (matched against the images' names, or a path relative to the CSV's folder);
- `row_px`, `col_px`: the crystal centre in pixels (pixel (0, 0)'s centre at 0, 0);
- `radius_px` (optional): the crystal's radius; empty or missing means a point;
- `diffracts` (optional): 1/0, true/false; empty means unknown (not counted in `recall_diffracting`).

An image that has no row is an image with no crystal (every detection on it is a false positive).
A grid-bar mask, if you have one, goes next to the image as `<name>.bars.png` (white = bar); the bar
IoU is then reported too. The pixel size comes from the file (TIFF resolution / our JSON metadata, MRC
header) or `pixel_size_um`; without one, tolerances and errors are in pixels.
"""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from agent.evaluation.runner import LabelledImage
from agent.evaluation.truth import ImageTruth, PixelCrystal
from drivers.formats.images import IMAGE_SUFFIXES, ImageFormatError, read_image

logger = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("image", "row_px", "col_px")


class LabelsError(ValueError):
    """The labels CSV or the image list is unusable; the message says which line and what to fix."""


def collect_image_paths(items: Sequence[str | Path]) -> list[Path]:
    """Image files from a mix of files and folders (folders: every file with a known image suffix, sorted)."""
    paths: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found = (p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and ".bars." not in p.name)
            paths.extend(sorted(found))
        elif path.is_file():
            paths.append(path)
        else:
            raise LabelsError(f"{path}: no such file or folder")
    if not paths:
        where = ", ".join(map(str, items))
        raise LabelsError(f"no image files found in {where} (suffixes: {', '.join(IMAGE_SUFFIXES)})")
    return paths


def read_labels_csv(path: str | Path) -> dict[str, list[tuple[float, float, float, bool | None]]]:
    """image name -> [(row_px, col_px, radius_px, diffracts)] from a labels CSV (see the module docstring)."""
    csv_path = Path(path)
    try:
        text = csv_path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise LabelsError(f"{csv_path}: cannot read labels ({exc})") from exc
    reader = csv.DictReader(text.splitlines())
    columns = [c.strip() for c in (reader.fieldnames or [])]
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise LabelsError(
            f"{csv_path}: missing column(s) {missing}; the header must have image,row_px,col_px[,radius_px]"
        )
    labels: dict[str, list[tuple[float, float, float, bool | None]]] = {}
    for line, raw in enumerate(reader, start=2):
        row = {(k or "").strip(): (v or "").strip() for k, v in raw.items()}
        try:
            r = float(row["row_px"])
            c = float(row["col_px"])
            radius = float(row["radius_px"]) if row.get("radius_px") else 0.0
        except ValueError as exc:
            raise LabelsError(f"{csv_path} line {line}: row_px, col_px and radius_px must be numbers ({exc})") from exc
        if not all(math.isfinite(v) for v in (r, c, radius)) or radius < 0:
            raise LabelsError(f"{csv_path} line {line}: coordinates must be finite and radius_px >= 0")
        if not row["image"]:
            raise LabelsError(f"{csv_path} line {line}: empty image name")
        labels.setdefault(Path(row["image"]).name, []).append((r, c, radius, _parse_bool(row.get("diffracts", ""))))
    return labels


def _parse_bool(text: str) -> bool | None:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "y"):
        return True
    if lowered in ("0", "false", "no", "n"):
        return False
    return None


def labelled_images(
    images: Sequence[str | Path],
    truth_csv: str | Path,
    *,
    pixel_size_um: float | None = None,
    specimen: str = "user",
    preset: str = "image",
    skipped: list[str] | None = None,
) -> Iterator[LabelledImage]:
    """Yield each image with its labels as a `LabelledImage` (one at a time: big images are not all held).

    Raises `LabelsError` for a bad CSV, and `ImageFormatError` (from `read_image`) for an unreadable image,
    unless `skipped` is given: then an unreadable image is left out, `"name: why"` appended to it, and the
    others still come. Labels for images not in `images` are ignored with a warning; labels outside their
    image are an error.
    """
    paths = collect_image_paths(images)
    labels = read_labels_csv(truth_csv)
    names = {p.name for p in paths}
    for name in sorted(set(labels) - names):
        logger.warning("%s: labels for %s ignored (the image is not among the images evaluated)", truth_csv, name)
    for path in paths:
        try:
            data = read_image(path)
        except ImageFormatError as exc:
            if skipped is None:
                raise
            logger.warning("%s: skipped, cannot be read (%s)", path.name, exc)
            skipped.append(f"{path.name}: {exc}")
            continue
        image = data.array
        rows, cols = image.shape
        um_per_px = pixel_size_um if pixel_size_um is not None else data.pixel_size_um
        crystals = []
        for index, (r, c, radius, diffracts) in enumerate(labels.get(path.name, [])):
            if not (-0.5 <= r <= rows - 0.5 and -0.5 <= c <= cols - 0.5):
                raise LabelsError(
                    f"{truth_csv}: crystal at row {r}, col {c} lies outside {path.name} ({rows}x{cols} px)"
                )
            crystals.append(PixelCrystal(
                id=index, row_px=r, col_px=c, row0_px=r, col0_px=c, row1_px=r, col1_px=c, half_width_px=radius,
                countable=True, diffracts=diffracts,
                length_um=2 * radius * um_per_px if (um_per_px and radius > 0) else None,
            ))
        bar_mask = _bar_mask_for(path, image.shape)
        truth = ImageTruth(shape_px=(rows, cols), crystals=tuple(crystals), um_per_px=um_per_px, bar_mask=bar_mask,
                           source=str(path))
        yield LabelledImage(image=image, truth=truth, specimen=specimen, preset=preset, name=path.name)


def _bar_mask_for(path: Path, shape: tuple[int, ...]) -> np.ndarray | None:
    mask_path = path.with_name(path.name + ".bars.png")
    if not mask_path.exists():
        mask_path = path.with_name(path.stem + ".bars.png")
    if not mask_path.exists():
        return None
    try:
        mask = read_image(mask_path).array > 0
    except ImageFormatError as exc:
        raise LabelsError(f"{mask_path}: cannot read the bar mask ({exc})") from exc
    if mask.shape != tuple(shape):
        raise LabelsError(f"{mask_path}: bar mask {mask.shape} does not match the image {tuple(shape)}")
    return mask
