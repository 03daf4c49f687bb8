"""ShapeTally: the synthetic benchmark world, a miniature of ViFT's setting.

A scene is a grid of cells, each empty or holding one coloured shape. Images are rendered from the
scene; captions describe it object by object (colour, shape, position) and never state a count.
Test questions compose perception (which shapes, which colours, how many) with a skill that no
caption teaches and that does not depend on the scene: arithmetic on, or comparison of, the
perceived quantities. So an LVLM needs both perception (from captions) and task solving (from
text-only instructions over scene descriptions) to answer: exactly the split ViFT trains on.

Everything is a pure function of (seed, split, index): the same seed gives byte-identical data.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 45, 45),
    "green": (40, 170, 70),
    "blue": (50, 85, 215),
    "yellow": (225, 195, 35),
}
SHAPES = ("circle", "square", "triangle")
BACKGROUND = (236, 236, 236)
NAMED_POSITIONS_2X2 = ("top left", "top right", "bottom left", "bottom right")
ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth")
NAMED_POSITIONS_3X3 = (
    "top left", "top middle", "top right",
    "middle left", "center", "middle right",
    "bottom left", "bottom middle", "bottom right",
)  # fmt: skip

# Board notation: one token per cell, in reading order (the tiny language model's symbolic "view"
# of a scene; see Scene.board). Special tokens, so each cell is exactly one token, like an image patch.
EMPTY_CELL_TOKEN = "<empty>"
CELL_TOKENS = (EMPTY_CELL_TOKEN, *(f"<{colour}_{shape}>" for colour in COLOURS for shape in SHAPES))

# Question templates, defined once: training data, evaluation and prompts all use these.
DESCRIBE_PROMPT = "Describe the image."
SCENE_PREFIX = "Scene: "
QUESTION_TYPES = ("count_plus", "remove_colour", "compare_colours", "double_count")
ARITHMETIC_TYPES = ("add", "subtract", "double", "greater")


@dataclass(frozen=True)
class SceneObject:
    cell: int
    colour: str
    shape: str


@dataclass(frozen=True)
class Scene:
    grid: int
    objects: tuple[SceneObject, ...]

    @property
    def signature(self) -> str:
        """A canonical string naming the scene; equal scenes have equal signatures."""
        return ";".join(f"{o.cell}:{o.colour}:{o.shape}" for o in self.objects)

    def position_name(self, cell: int) -> str:
        # Words, not digits: captions must never contain numbers (counts are not perceived text).
        if self.grid == 2:
            return NAMED_POSITIONS_2X2[cell]
        if self.grid == 3:
            return NAMED_POSITIONS_3X3[cell]
        return f"{ORDINALS[cell // self.grid]} row, {ORDINALS[cell % self.grid]} column"

    def describe(self) -> str:
        """The caption: every object in reading order, no counts."""
        if not self.objects:
            return "an empty board."
        return ", ".join(self.phrase(o) for o in self.objects) + "."

    def phrase(self, obj: SceneObject) -> str:
        """One object in the caption's words ("red circle at top left"); captions and reasoning chains share it."""
        return f"{obj.colour} {obj.shape} at {self.position_name(obj.cell)}"

    def board(self) -> str:
        """The scene in board notation: one cell token per grid cell, in reading order.

        The tiny default's language model learns (text only, in ``backbone_text``) to turn a board
        into a description, the way an instruction-tuned LLM already knows how to talk about
        objects. With one 16 px patch per cell, the caption stage then aligns image patches to a
        space the frozen language model can read, as stage 1 of the paper does.
        """
        cells = [EMPTY_CELL_TOKEN] * (self.grid * self.grid)
        for o in self.objects:
            cells[o.cell] = f"<{o.colour}_{o.shape}>"
        return "".join(cells)

    def count(self, colour: str | None = None, shape: str | None = None) -> int:
        return sum(1 for o in self.objects if (colour is None or o.colour == colour) and (shape is None or o.shape == shape))


@dataclass(frozen=True)
class Question:
    type: str
    text: str
    answer: str
    # The same answer as a short reasoning chain: first restate the facts the question needs (the
    # relevant objects, as the caption words them), then compute, then "so the answer is <answer>".
    # Training data with ``data.text_answers: reasoning`` (docs/RESULTS.md, "Reasoning chains").
    reasoning: str = ""


def split_rng(seed: int, split: str, index: int) -> random.Random:
    """Independent deterministic stream per (seed, split, index); str seeds hash with SHA-512."""
    return random.Random(f"shapetally:{seed}:{split}:{index}")


def sample_scene(rng: random.Random, grid: int, min_objects: int, max_objects: int) -> Scene:
    n = rng.randint(min_objects, max_objects)
    cells = sorted(rng.sample(range(grid * grid), n))
    objects = tuple(SceneObject(c, rng.choice(list(COLOURS)), rng.choice(SHAPES)) for c in cells)
    return Scene(grid, objects)


def _pick_present(rng: random.Random, scene: Scene, options: list[str], attribute: str) -> str:
    """Mostly ask about attributes the scene has (so counts are not almost always zero)."""
    present = sorted({getattr(o, attribute) for o in scene.objects})
    if present and rng.random() < 0.75:
        return rng.choice(present)
    return rng.choice(options)


def _restate(scene: Scene, objects: list[SceneObject]) -> str:
    """Objects as the caption words them ("red circle at top left, ..."), or "none"."""
    return ", ".join(scene.phrase(o) for o in objects) or "none"


def _conclude(answer: str) -> str:
    # Numeric answers are extracted as the last number, yes/no as the first yes or no
    # (vift.scoring.answers): chains say neither word before this, and end on the answer.
    return f"so the answer is {answer}."


def sample_question(rng: random.Random, scene: Scene, qtype: str | None = None) -> Question:
    """A composed question: perception of the scene + arithmetic or comparison."""
    qtype = qtype or rng.choice(QUESTION_TYPES)
    colours = list(COLOURS)
    objects = list(scene.objects)
    if qtype == "count_plus":
        shape = _pick_present(rng, scene, list(SHAPES), "shape")
        k = rng.randint(1, 4)
        n = scene.count(shape=shape)
        chain = f"the {shape}s are {_restate(scene, [o for o in objects if o.shape == shape])}. that is {n}. {n} plus {k} is {n + k}."
        return Question(qtype, f"How many {shape}s are there, plus {k}?", str(n + k), f"{chain} {_conclude(str(n + k))}")
    if qtype == "remove_colour":
        colour = _pick_present(rng, scene, colours, "colour")
        rest = [o for o in objects if o.colour != colour]
        chain = f"the shapes that are not {colour} are {_restate(scene, rest)}. that is {len(rest)}."
        return Question(qtype, f"How many shapes would remain if the {colour} ones were removed?", str(len(rest)), f"{chain} {_conclude(str(len(rest)))}")  # fmt: skip
    if qtype == "compare_colours":
        first = _pick_present(rng, scene, colours, "colour")
        second = rng.choice([c for c in colours if c != first])
        n1, n2 = scene.count(colour=first), scene.count(colour=second)
        answer = "yes" if n1 > n2 else "no"
        chain = (
            f"the {first} ones are {_restate(scene, [o for o in objects if o.colour == first])}. that is {n1}. "
            f"the {second} ones are {_restate(scene, [o for o in objects if o.colour == second])}. that is {n2}. "
            f"{n1} is {'more' if n1 > n2 else 'not more'} than {n2}."
        )
        return Question(qtype, f"Are there more {first} shapes than {second} shapes?", answer, f"{chain} {_conclude(answer)}")
    if qtype == "double_count":
        colour = _pick_present(rng, scene, colours, "colour")
        n = scene.count(colour=colour)
        chain = f"the {colour} ones are {_restate(scene, [o for o in objects if o.colour == colour])}. that is {n}. twice {n} is {2 * n}."
        return Question(qtype, f"What is twice the number of {colour} shapes?", str(2 * n), f"{chain} {_conclude(str(2 * n))}")
    raise ValueError(f"unknown question type {qtype!r}; known: {', '.join(QUESTION_TYPES)}")


def sample_arithmetic(rng: random.Random, max_value: int) -> Question:
    """Scene-free arithmetic in the same answer format: the text-only skill in isolation."""
    kind = rng.choice(ARITHMETIC_TYPES)
    x, y = rng.randint(0, max_value), rng.randint(0, max_value)
    if kind == "add":
        return Question("arith_add", f"What is {x} plus {y}?", str(x + y), f"{x} plus {y} is {x + y}. {_conclude(str(x + y))}")
    if kind == "subtract":
        x, y = max(x, y), min(x, y)
        return Question("arith_subtract", f"What is {x} minus {y}?", str(x - y), f"{x} minus {y} is {x - y}. {_conclude(str(x - y))}")
    if kind == "double":
        return Question("arith_double", f"What is twice {x}?", str(2 * x), f"twice {x} is {2 * x}. {_conclude(str(2 * x))}")
    answer = "yes" if x > y else "no"
    chain = f"{x} is {'greater' if x > y else 'not greater'} than {y}."
    return Question("arith_greater", f"Is {x} greater than {y}?", answer, f"{chain} {_conclude(answer)}")


def text_prompt(description: str, question: str) -> str:
    """The text-only form of a composed question: the scene given as a description."""
    return f"{SCENE_PREFIX}{description}\n{question}"


def render(scene: Scene, image_size: int, rng: random.Random) -> Image.Image:
    """Draw the scene; size, offset and colour jitter come from ``rng`` (deterministic)."""
    image = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    cell = image_size // scene.grid
    for obj in scene.objects:
        row, col = divmod(obj.cell, scene.grid)
        extent = max(3, int(cell * rng.uniform(0.55, 0.85)))
        x0 = col * cell + rng.randint(0, cell - extent)
        y0 = row * cell + rng.randint(0, cell - extent)
        box = (x0, y0, x0 + extent - 1, y0 + extent - 1)
        fill = tuple(max(0, min(255, v + rng.randint(-20, 20))) for v in COLOURS[obj.colour])
        if obj.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif obj.shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(x0 + extent // 2, y0), (box[0], box[3]), (box[2], box[3])], fill=fill)
    return image
