"""Answering benchmark records with a model: images read from the benchmark's folder a batch at a time.

The batching and generation are :func:`vift.eval.runner.answer_in_batches`, the loop the evaluation
stage uses; what is particular to the benchmarks is here: each record's image is read from the data
folder (an unreadable one is a :class:`~vift.errors.UserError` naming the record), and records
without an image (MathVerse Text Only) are asked text-only, without fusion. With ``controls``,
the same records are answered again under the ablation's controls (:func:`generate_answers`'s ``control``).
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


# The ablation's controls (docs/EVALUATION.md), for a benchmark: the same records answered
# without their image, with another record's image, and with a black image of the same size.
CONTROLS = ("question_only", "wrong_image", "blank_image")


def generate_answers(
    model,
    processor,
    records: Sequence[VQARecord],
    data_dir: str | Path,
    fusion,
    batch_size: int,
    max_new_tokens: int,
    progress: Callable[[int, int], None] | None = None,
    control: str | None = None,
    seed: int = 0,
) -> list[str]:
    """Responses in record order; images are loaded a batch at a time.

    Records without an image (MathVerse Text Only) are asked text-only, without fusion (fusion adds
    text-only states to an image pass; there is none), under every control too. ``control`` None is
    the main run; ``question_only`` asks every question text-only (no image, so no fusion);
    ``wrong_image`` gives each record with an image another such record's image (a seeded
    permutation without fixed points, as the ablation's) and ``blank_image`` a black image of its
    own image's size, both answered as the main run (with its fusion).
    """
    from vift.eval.ablation import wrong_image_order

    if control is not None and control not in CONTROLS:
        raise ValueError(f"unknown control {control!r}; one of {', '.join(CONTROLS)}")
    with_image = [i for i, record in enumerate(records) if record.image is not None]
    donor = {i: i for i in with_image}
    if control == "wrong_image":
        order = wrong_image_order(len(with_image), seed)
        donor = {with_image[k]: with_image[order[k]] for k in range(len(with_image))}

    def batch_images(indices: list[int]) -> list[Image.Image | None]:
        images = []
        for i in indices:
            if control == "question_only" or records[i].image is None:
                images.append(None)
            elif control == "blank_image":
                images.append(Image.new("RGB", load_image(records[i], data_dir).size))
            else:
                images.append(load_image(records[donor[i]], data_dir))
        return images

    questions = [record.question for record in records]
    return answer_in_batches(model, processor, questions, fusion, batch_size, max_new_tokens, batch_images, progress)
