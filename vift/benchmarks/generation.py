"""Answering benchmark records with a model: images read from the benchmark's folder a batch at a time.

The batching and generation are :func:`vift.eval.runner.answer_in_batches`, the loop the evaluation
stage uses; what is particular to the benchmarks is here: each record's image is read from the data
folder (an unreadable one is a :class:`~vift.errors.UserError` naming the record), and records
without an image (MathVerse Text Only) are asked text-only, without fusion.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from vift.data.manifests import VQARecord, load_rgb
from vift.errors import UserError
from vift.eval.runner import answer_in_batches


def load_image(record: VQARecord, data_dir: str | Path) -> Image.Image:
    path = Path(data_dir) / str(record.image)
    try:
        return load_rgb(path)
    except (FileNotFoundError, UnidentifiedImageError, OSError) as error:
        raise UserError(f"record {record.id}: image {path} unreadable ({error})") from None


def generate_answers(
    model,
    processor,
    records: Sequence[VQARecord],
    data_dir: str | Path,
    fusion,
    batch_size: int,
    max_new_tokens: int,
    progress: Callable[[int, int], None] | None = None,
) -> list[str]:
    """Responses in record order; images are loaded a batch at a time.

    Records without an image (MathVerse Text Only) are asked text-only, without fusion (fusion adds
    text-only states to an image pass; there is none).
    """

    def batch_images(indices: list[int]) -> list[Image.Image | None]:
        return [None if records[i].image is None else load_image(records[i], data_dir) for i in indices]

    questions = [record.question for record in records]
    return answer_in_batches(model, processor, questions, fusion, batch_size, max_new_tokens, batch_images, progress)
