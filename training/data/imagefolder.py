"""Captioned images in the Hugging Face imagefolder layout: a folder plus metadata.jsonl,
or metadata.csv.

Each line of metadata.jsonl is a JSON object with `file_name` (relative to the folder)
and `text` (the caption); metadata.csv has those columns, with a header row. Other keys
or columns (attributes) are kept. Users bring arbitrary
photos, so every image is resized (shorter side) and centre-cropped to a square, and a
file that is missing or unreadable is skipped and counted, never a crash: one bad file
in ten thousand should not cost a training run.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

log = logging.getLogger(__name__)

METADATA = "metadata.jsonl"
METADATA_CSV = "metadata.csv"


@dataclass
class CaptionedImages:
    """What every image data source hands the training job."""
    images: torch.Tensor                      # (N, 3, S, S) uint8
    captions: list[str]
    attributes: list[dict[str, Any]] = field(default_factory=list)  # empty when unknown
    # Optional hard negatives: a caption per image that is almost right (one attribute
    # changed). Without them the job uses another image's caption.
    negatives: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.captions)

    @property
    def image_size(self) -> int:
        return self.images.shape[-1]

    def digest(self) -> str:
        """Content hash (pixels + captions): the store label that says which data made a model."""
        h = hashlib.sha256()
        h.update(self.images.numpy().tobytes())
        h.update("\n".join(self.captions).encode())
        return h.hexdigest()[:16]


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB, upright. A camera's EXIF orientation is applied (else a phone photo trains
    sideways); transparent pixels are laid over white (PIL's own conversion drops the alpha, so
    they took whatever colour they stored). PIL's conversion also clips 16-bit grey to white (it
    keeps the low values); here it is scaled down. Floating-point pixels have no known range: a
    ValueError (the file is skipped as unreadable)."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        grey = np.asarray(img, dtype=np.float64) / 257  # 65535 -> 255
        img = Image.fromarray(grey.clip(0, 255).round().astype(np.uint8), "L")
    elif img.mode == "F":
        raise ValueError("floating-point pixels: save the image with 8 or 16 bits per channel")
    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
        img = Image.alpha_composite(Image.new("RGBA", img.size, "white"), img.convert("RGBA"))
    return img.convert("RGB")


def resize_center_crop(img: Image.Image, size: int) -> np.ndarray:
    """Any image → (size, size, 3) uint8: scale the shorter side to `size`, crop the middle."""
    img = to_rgb(img)
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.uint8)


def read_metadata(path: Path) -> str:
    """The whole file as text. Unlike one bad line, a file in another encoding, or one this
    user may not read, cannot be read at all: a ValueError naming it (a UTF-8 byte-order mark,
    as some editors write, is fine)."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 (byte {e.start}: {e.reason}); save it as UTF-8") from None
    except OSError as e:
        raise ValueError(f"{path}: cannot be read ({e.strerror})") from None


def json_lines(text: str) -> list[str]:
    """A JSON Lines file's lines: split at "\n" only. str.splitlines also splits at U+2028,
    U+2029, NEL and other characters JSON allows unescaped inside a string (json.dumps with
    ensure_ascii=False and JavaScript's JSON.stringify write U+2028 as is), which cut such a
    line in two bad halves."""
    return text.split("\n")


def metadata_rows(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, row) of metadata.jsonl or metadata.csv: a row as read (a dict from a good
    line; None for a line that is not JSON, which the caller counts as bad)."""
    text = read_metadata(path)
    if path.name == METADATA_CSV:
        yield from csv_rows(path, text)
        return
    for number, line in enumerate(json_lines(text), 1):
        if line.strip():
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError:
                yield number, None


def csv_rows(path: Path, text: str) -> Iterator[tuple[int, dict[str | None, Any]]]:
    """metadata.csv's records as metadata_rows gives them: (the line a record starts on, its
    cells by column name). Cells past the header's columns come under the key None, a short
    row's missing ones are None (as csv.DictReader has them); a column without a name (the
    trailing commas some spreadsheets write) is left out; blank lines are skipped."""
    # strict: an unclosed quote is an error, not the rest of the file read as one caption
    reader = csv.reader(io.StringIO(text), strict=True)
    line = 0  # the last line read
    try:
        header = next(reader, [])
        named = [name for name in header if name]
        if len(set(named)) < len(named):
            raise ValueError(f"{path}: the header names a column twice ({','.join(header)})")
        line = reader.line_num
        for cells in reader:
            start, line = line + 1, reader.line_num
            if cells:
                row: dict[str | None, Any] = {name: cell for name, cell in zip(header, cells) if name}
                row.update({name: None for name in header[len(cells):] if name})
                if len(cells) > len(header):
                    row[None] = cells[len(header):]
                yield start, row
    except csv.Error as e:  # a bad quote, a field past csv's size limit
        raise ValueError(f"{path}: line {line + 1} is not CSV ({e})") from None


def skipped_summary(skipped: dict[str, list[str]], shown: int = 3) -> str:
    """"1 missing (b.png), 2 unreadable (c.png, d.png)": the counts, and the first few entries
    of each, so that a user with thousands of images can find the bad ones."""
    parts = []
    for kind, names in skipped.items():
        if names:
            more = f", … {len(names) - shown} more" if len(names) > shown else ""
            parts.append(f"{len(names)} {kind} ({', '.join(names[:shown])}{more})")
    return ", ".join(parts)


def load_imagefolder(folder: str | Path, image_size: int = 32) -> CaptionedImages:
    """Read `folder/metadata.jsonl` (or metadata.csv) and its images; skipped files are counted in
    one warning."""
    if not str(folder).strip():  # Path("") is ".": the working directory was read
        raise ValueError("--data is empty: give 'shapes' (the built-in data) or a folder of images and metadata.jsonl")
    folder = Path(folder)
    if folder.is_file():
        raise ValueError(f"{folder}: a file; --data names a folder of images and metadata.jsonl")
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder (--data names a folder of images and metadata.jsonl)")
    found = [folder / name for name in (METADATA, METADATA_CSV) if (folder / name).is_file()]
    if not found:
        raise FileNotFoundError(f"{folder / METADATA}: no metadata.jsonl (one JSON object per line with 'file_name' "
                                "and 'text') nor metadata.csv (those columns, with a header row)")
    if len(found) > 1:
        raise ValueError(f"{folder}: both metadata.jsonl and metadata.csv; keep one")
    meta_path = found[0]
    images, captions, attributes = [], [], []
    skipped: dict[str, list[str]] = {"missing": [], "unreadable": [], "bad metadata line": []}
    for number, row in metadata_rows(meta_path):
        try:
            name, text = row["file_name"], row["text"]
        except (KeyError, TypeError):
            skipped["bad metadata line"].append(f"line {number}")
            continue
        # Also bad: a caption that is not text (null, 42: it would be trained on as "None", "42")
        # or is blank (a prompt the service refuses), a file name that is not text.
        if not isinstance(name, str) or not isinstance(text, str) or not text.strip():
            skipped["bad metadata line"].append(f"line {number}")
            continue
        path = folder / name
        if not path.is_file():
            skipped["missing"].append(name)
            continue
        try:
            with Image.open(path) as img:
                images.append(resize_center_crop(img, image_size))
        # A decompression bomb (an image too large to decode safely) is as unusable as a
        # corrupt one; the warning PIL gives for a merely large one may be set to raise. PIL
        # raises SyntaxError for some broken PNG chunks.
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError,
                Image.DecompressionBombWarning):
            skipped["unreadable"].append(name)
            continue
        captions.append(text)
        # (a CSV row's cells past the header's columns come under the key None; a short row's
        # missing ones have the value None: not attributes it has)
        attributes.append({k: v for k, v in row.items() if k not in ("file_name", "text", None) and v is not None})
    if count := sum(map(len, skipped.values())):
        log.warning("%s: skipped %d entries: %s", folder, count, skipped_summary(skipped))
    if not images:  # what each line needs, when none had it (the usual mistake: other keys)
        why = skipped_summary(skipped) or "none listed"
        raise ValueError(f"{folder}: no readable images ({why}; each line of {meta_path.name} gives "
                         "'file_name', an image file in the folder, and 'text', its caption)")
    stacked = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()  # (N, 3, S, S)
    # Attributes are only useful when every row has them (evaluation needs labels for all).
    keep_attrs = all(attributes)
    return CaptionedImages(stacked, captions, attributes if keep_attrs else [])


def write_imagefolder(folder: str | Path, images: list[np.ndarray], captions: list[str],
                      attributes: list[dict[str, Any]] | None = None) -> Path:
    """Write PNGs and metadata.jsonl in the layout `load_imagefolder` reads."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (img, text) in enumerate(zip(images, captions, strict=True)):
        name = f"{i:06d}.png"
        Image.fromarray(img).save(folder / name)
        row: dict[str, Any] = {"file_name": name, "text": text}
        if attributes:
            row.update(attributes[i])
        lines.append(json.dumps(row))
    (folder / METADATA).write_text("\n".join(lines) + "\n")
    return folder
