"""The dataset-hub parquet layouts of the real benchmarks: shards, rows, and the images they embed.

The hub copies of MathVista (``data/testmini-00000-of-00001-*.parquet``), MathVerse
(``testmini.parquet``, ``testmini_text_only.parquet``) and MathVision (``data/testmini-*.parquet``,
``data/test-*.parquet``) hold the same records as the repositories' JSON files, with the images
embedded as the hub's image feature: a struct ``{bytes, path}`` in ``decoded_image`` (MathVista,
MathVision, beside a relative ``image`` path) or in ``image`` itself (MathVerse).

:func:`shards` finds every shard of a split and refuses an incomplete set; :func:`rows` reads them
in order with pyarrow, a batch at a time (a ``--limit`` run does not decode the whole file), and
turns each row into the dict the JSON loaders read: nulls and NaNs become ``None``, and ``image``
becomes the embedded bytes when there are any. :class:`ImageStore` writes embedded images into a
folder of the caller's (named by content hash, checked by decoding), so records point at files as
they do for the JSON layouts. The ``path`` inside the image struct is the uploader's file name, not
a file on this machine: it is never opened.
"""

from __future__ import annotations

import glob
import hashlib
import io
import math
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from vift.errors import UserError

_SHARD = re.compile(r"^(?P<stem>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})(?P<rest>.*)\.parquet$")
IMAGE_COLUMNS = ("decoded_image", "image")  # where the hub embeds image bytes, in the order tried


def shards(path: Path) -> list[Path]:
    """All shards of the split ``path`` belongs to (``NAME-00000-of-00003-HASH.parquet``), in order."""
    found = _SHARD.match(path.name)
    if not found:
        return [path]
    count = int(found["count"])
    prefix = f"{found['stem']}-"
    suffix = f"-of-{found['count']}"
    by_index: dict[int, Path] = {}
    for candidate in sorted(path.parent.glob(f"{glob.escape(prefix)}*{suffix}*.parquet")):
        match = _SHARD.match(candidate.name)
        if match and match["stem"] == found["stem"] and match["count"] == found["count"]:
            by_index.setdefault(int(match["index"]), candidate)
    missing = [i for i in range(count) if i not in by_index]
    if missing:
        names = ", ".join(f"{found['stem']}-{i:05d}-of-{found['count']}*.parquet" for i in missing[:3])
        raise UserError(
            f"{path}: shard {names} of this split is missing from {path.parent} ({count} shards expected); download the whole split",
            exit_code=2,
        )
    return [by_index[i] for i in range(count)]


def _plain(value: Any) -> Any:
    """A parquet value as the JSON loaders expect it: NaN → None, recursively."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _image_field(row: dict) -> Any:
    """Embedded bytes if any image column holds them, else the relative ``image`` path (or None)."""
    for column in IMAGE_COLUMNS:
        value = row.get(column)
        if isinstance(value, dict) and value.get("bytes"):
            return bytes(value["bytes"])
    value = row.get("image")
    if isinstance(value, dict):  # an image struct without bytes: the uploader's name, not ours to open
        return None
    return value


def rows(paths: Sequence[Path], limit: int | None = None, batch_size: int = 64) -> Iterator[tuple[str, dict]]:
    """``(where, row)`` for each row of the shards, in order; ``where`` names the shard and row."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    produced = 0
    for path in paths:
        try:
            handle = pq.ParquetFile(path)
            row_no = 0
            for batch in handle.iter_batches(batch_size=batch_size):
                for raw in batch.to_pylist():
                    row = _plain(raw)
                    row["image"] = _image_field(row)
                    yield (f"row {row_no}" if len(paths) == 1 else f"{path.name} row {row_no}"), row
                    row_no += 1
                    produced += 1
                    if limit is not None and produced >= limit:
                        return
        except (pa.ArrowException, OSError) as error:
            raise UserError(f"{path}: not a readable parquet file ({str(error).splitlines()[0]})", exit_code=2) from None


class ImageStore:
    """Writes embedded images into ``folder`` once each, by content hash, after decoding them."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)

    def put(self, data: bytes) -> tuple[str | None, str | None]:
        """``(file name in the folder, None)``, or ``(None, problem)`` when the bytes are no image."""
        from PIL import Image, UnidentifiedImageError

        from vift.data.manifests import check_image

        try:
            with Image.open(io.BytesIO(data)) as image:
                kind = (image.format or "img").lower()
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as error:
            return None, f"embedded image unreadable ({error})"
        name = f"{hashlib.sha256(data).hexdigest()[:24]}.{kind}"
        target = self.folder / name
        if not target.is_file():
            partial = target.with_suffix(".part")
            partial.write_bytes(data)
            if problem := check_image(partial):
                partial.unlink()
                return None, f"embedded image unreadable ({problem.split(': ', 1)[-1]})"
            partial.replace(target)
        return name, None
