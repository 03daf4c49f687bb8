"""The parameter schema: one section per pipeline concern, as dvc.yaml reads them by dotted key.

Every model forbids unknown keys, so a typo in a YAML file is an error naming the field, not a
silently ignored setting.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator


def _refuse_bool(value: Any) -> Any:
    # pydantic's lax mode reads true as 1; strict mode would also refuse YAML's "1e-4" (a string to
    # PyYAML), which users write for learning rates. So only booleans are refused.
    if isinstance(value, bool):
        raise ValueError(f"expected a number, not the boolean {str(value).lower()}")
    return value


Int = Annotated[int, BeforeValidator(_refuse_bool)]
Float = Annotated[float, BeforeValidator(_refuse_bool)]
STRICT = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class Section(BaseModel):
    model_config = STRICT


class DataParams(Section):
    """The benchmark data: the synthetic ShapeTally world, or imported manifests."""

    source: Literal["shapetally", "import"] = "shapetally"
    seed: Int = 0
    image_size: Int = Field(48, ge=16, le=512, description="pixels per side of a scene image")
    grid: Int = Field(3, ge=2, le=6, description="scene is a grid x grid board, one shape per cell")
    min_objects: Int = Field(1, ge=0)
    max_objects: Int = Field(6, ge=1)
    backbone_text: Int = Field(20000, ge=0, description="text samples that pretrain the tiny LM")
    captions: Int = Field(4000, ge=0)
    text_instructions: Int = Field(4000, ge=0)
    visual_instructions: Int = Field(4000, ge=0)
    calibration: Int = Field(200, ge=0)
    test: Int = Field(1000, ge=0)
    text_answers: Literal["short", "reasoning"] = Field(
        "short",
        description="text instructions answer with the answer alone, or with a short chain that restates the "
        "relevant objects, computes, and ends 'so the answer is ...' (shapetally only; raise eval.max_new_tokens)",
    )
    backbone_answers: Literal["short", "reasoning"] = Field(
        "short",
        description="the same choice for the composed questions and arithmetic of backbone_text, the tiny "
        "language model's pretraining: reasoning gives a language model that already writes such chains, as "
        "the paper's instruct LLM does (shapetally only)",
    )
    bad_records: Literal["skip", "fail"] = Field(
        "skip", description="skip-and-count malformed records and missing images, or fail on the first"
    )
    import_dir: str | None = Field(None, description="directory of external manifests (source: import)")
    name: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$",
        description="the data set's name (set by `vift data import` from the folder's name); names the registered model",
    )

    @model_validator(mode="after")
    def _objects_fit_the_grid(self) -> DataParams:
        if self.min_objects > self.max_objects:
            raise ValueError("min_objects must not exceed max_objects")
        if self.max_objects > self.grid * self.grid:
            raise ValueError(f"max_objects ({self.max_objects}) exceeds the {self.grid}x{self.grid} grid's cells")
        if self.image_size % self.grid:
            raise ValueError(f"image_size ({self.image_size}) must be a multiple of grid ({self.grid})")
        if self.source == "import" and not self.import_dir:
            raise ValueError("source 'import' needs import_dir")
        for name in ("text_answers", "backbone_answers"):
            if self.source == "import" and getattr(self, name) != "short":
                raise ValueError(f"{name} applies to generated data (source: shapetally); imported manifests keep their own answers")
        return self


class TinyModelParams(Section):
    """Architecture of the offline default: LLaVA = SigLIP vision tower + projector + Qwen2 LM."""

    vocab_size: Int = Field(400, ge=64)
    hidden_size: Int = Field(128, ge=8)
    intermediate_size: Int = Field(256, ge=8)
    num_layers: Int = Field(4, ge=1)
    num_heads: Int = Field(4, ge=1)
    num_kv_heads: Int = Field(2, ge=1)
    vision_hidden_size: Int = Field(96, ge=8)
    vision_intermediate_size: Int = Field(192, ge=8)
    vision_layers: Int = Field(2, ge=1)
    vision_heads: Int = Field(2, ge=1)
    patch_size: Int = Field(16, ge=2)
    max_positions: Int = Field(256, ge=32)

    @model_validator(mode="after")
    def _heads_divide(self) -> TinyModelParams:
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError("hidden_size must divide by num_heads, and num_heads by num_kv_heads")
        if self.vision_hidden_size % self.vision_heads:
            raise ValueError("vision_hidden_size must divide by vision_heads")
        return self


class PretrainParams(Section):
    """Pretraining of the tiny language model on backbone_text (stand-in for an instruct LLM)."""

    max_steps: Int = Field(800, ge=1)
    batch_size: Int = Field(64, ge=1)
    learning_rate: Float = Field(3e-3, gt=0)
    warmup_ratio: Float = Field(0.05, ge=0, le=1)
    max_length: Int = Field(160, ge=8, description="dynamic padding: only a cap on the longest record")


class ModelParams(Section):
    base: str = Field(
        "tiny",
        description="'tiny' builds the offline default; 'compose' joins vision_tower + language_model "
        "into a LLaVA model (the paper's setup); otherwise a local HF LVLM checkpoint directory",
    )
    vision_tower: str | None = Field(
        None,
        description="local SigLIP checkpoint (base: compose); 'scratch': a SigLIP tower built from model.tiny's "
        "vision settings at data.image_size, randomly initialised, for the caption stage to train",
    )
    language_model: str | None = Field(None, description="local causal LM checkpoint (base: compose)")
    vision_feature_layer: Int = Field(-2, description="vision layer fed to the projector (base: compose)")
    family: Literal[
        "auto", "llava", "llava_onevision", "llava_next", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "idefics2", "idefics3",
        "smolvlm", "paligemma", "gemma3", "aya_vision", "internvl",
    ] = "auto"  # fmt: skip
    trust_remote_code: bool = False
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    tiny: TinyModelParams = TinyModelParams()
    pretrain: PretrainParams = PretrainParams()

    @model_validator(mode="after")
    def _compose_has_parts(self) -> ModelParams:
        if self.base == "compose" and not (self.vision_tower and self.language_model):
            raise ValueError("base 'compose' needs vision_tower and language_model paths")
        return self


class LoraParams(Section):
    enabled: bool = False
    r: Int = Field(8, ge=1)
    alpha: Int = Field(16, ge=1)
    dropout: Float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj"]


TrainablePart = Literal["projector", "language_model", "vision_tower"]


class StageTrainParams(Section):
    """One training stage; names follow transformers' TrainingArguments where they overlap."""

    trainable: list[TrainablePart] = ["projector"]
    learning_rate: Float = Field(1e-3, gt=0, description="language model (and default) learning rate")
    projector_learning_rate: Float | None = Field(None, gt=0)
    vision_learning_rate: Float | None = Field(None, gt=0)
    num_train_epochs: Float = Field(1.0, gt=0)
    max_steps: Int = Field(-1, ge=-1, description="-1: run num_train_epochs")
    per_device_train_batch_size: Int = Field(32, ge=1)
    gradient_accumulation_steps: Int = Field(1, ge=1)
    max_length: Int = Field(128, ge=8)
    lr_scheduler_type: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    warmup_ratio: Float = Field(0.03, ge=0, le=1)
    weight_decay: Float = Field(0.0, ge=0)
    max_grad_norm: Float = Field(1.0, gt=0)
    text_ratio: Float = Field(
        0.5,
        ge=0,
        le=1,
        description="share of instruction samples in the mix with captions: text-only instructions "
        "(text stage), visual instructions (vit stage); the caption stage trains on captions only",
    )
    gradient_checkpointing: bool = False
    bf16: Literal["auto", "true", "false"] = "auto"
    lora: LoraParams = LoraParams()
    save_steps: Int = Field(100, ge=1)
    logging_steps: Int = Field(10, ge=1)
    seed: Int = 0
    accelerate_config: str | None = Field(None, description="accelerate config file; launches under it")
    num_processes: Int = Field(1, ge=1)

    @model_validator(mode="after")
    def _trains_something(self) -> StageTrainParams:
        if not self.trainable:
            raise ValueError("trainable must name at least one part")
        return self


class TrainParams(Section):
    caption: StageTrainParams = StageTrainParams()
    text: StageTrainParams = StageTrainParams(trainable=["projector", "language_model"], learning_rate=3e-4)
    vit: StageTrainParams = StageTrainParams(trainable=["projector", "language_model"], learning_rate=3e-4)
    caption_check: Int = Field(100, ge=0, description="held-out calibration images captioned after each stage to measure perception")
    check_batch_size: Int = Field(
        64,
        ge=1,
        description="generation batch of the checks the base and training stages run (caption check, text "
        "accuracy); its own knob so that changing eval.batch_size reruns no training",
    )
    data_fraction: Float = Field(
        1.0,
        gt=0,
        le=1,
        description="share of the caption, text-instruction and visual-instruction records the training "
        "stages draw from: the first ceil(fraction * n) of each manifest, so smaller fractions are subsets "
        "of larger ones (the data-efficiency sweep varies it; optimizer steps stay as configured)",
    )

    @model_validator(mode="after")
    def _baseline_at_equal_compute(self) -> TrainParams:
        # The baseline must train at the text stage's compute: steps, batch, mix and processes.
        equal_compute = (
            "max_steps",
            "num_train_epochs",
            "per_device_train_batch_size",
            "gradient_accumulation_steps",
            "text_ratio",
            "num_processes",
        )
        for name in equal_compute:
            text, vit = getattr(self.text, name), getattr(self.vit, name)
            if text != vit:
                raise ValueError(f"vit.{name} ({vit}) must equal text.{name} ({text}): the baseline trains at the text stage's compute")
        return self


class CalibrationParams(Section):
    search: bool = Field(
        True,
        description="search the grid below (seeded with the fusion section's own configuration); false: serve "
        "the fusion section's configuration as given, measured against no fusion but not replaced",
    )
    modes: list[Literal["additive", "replace", "task_vector"]] = Field(
        ["additive", "replace"], description="task_vector: a·d, d the mean of T − V over the calibration items (computed here)"
    )
    positions: list[Literal["question", "text_prompt"]] = ["question"]
    weights: list[Float] = [0.0, 0.25, 0.5, 0.75, 1.0]
    layer_ranges: list[tuple[Int, Int]] | None = Field(None, description="[start, end) candidates; None: derived from the model's depth")
    preserve_norm: list[bool] = Field([False], description="norm-preserving injection off/on (searched like a mode)")
    steer_prefix: list[bool] = Field(
        [False], description="also steer the positions before the question, image included (additive configurations only)"
    )
    budget: Int = Field(60, ge=1, description="most configurations evaluated (coarse grid + refinement)")
    batch_size: Int = Field(32, ge=1)
    significance: Float = Field(
        0.05,
        gt=0,
        le=1,
        description="family-wise level: the best configuration replaces no fusion only with McNemar p below "
        "significance / configurations evaluated and the paired bootstrap CI above 0; 1 turns the check off",
    )
    folds: Int = Field(
        5,
        ge=0,
        description="k-fold cross-validation of the choice: each fold of calibration items is held out while the same "
        "rule chooses on the others; reports the chosen configurations' held-out gain over no fusion (0 or 1: off)",
    )
    require_held_out_gain: bool = Field(
        False,
        description="keep no fusion unless the cross-validated choice also beats it on held-out items beyond chance "
        "(paired bootstrap CI above 0 and McNemar p below significance); needs folds >= 2",
    )

    @model_validator(mode="after")
    def _search_space_is_not_empty(self) -> CalibrationParams:
        for name in ("modes", "positions", "weights", "preserve_norm", "steer_prefix"):
            if not getattr(self, name):
                raise ValueError(f"{name} must list at least one value (the search would be empty)")
        if self.require_held_out_gain and self.folds < 2:
            raise ValueError("require_held_out_gain needs folds >= 2 (the held-out gain is measured by cross-validation)")
        if self.steer_prefix == [True] and "additive" not in self.modes:
            raise ValueError("steer_prefix [true] needs the additive mode among modes (replace cannot steer the prefix)")
        if self.layer_ranges is not None:
            if not self.layer_ranges:
                raise ValueError("layer_ranges must list at least one [start, end) range, or be null")
            for index, (start, end) in enumerate(self.layer_ranges):
                if start < 0 or end <= start:
                    raise ValueError(f"layer_ranges[{index}] = [{start}, {end}]: need 0 <= start < end")
        return self


class FusionParams(Section):
    """The fusion configuration to start from (or, with ``calibrate.search: false``, to serve)."""

    mode: Literal["additive", "replace", "task_vector"] = "additive"
    positions: Literal["question", "text_prompt"] = "question"
    a: Float = 0.0
    b: Float = 0.0
    w_vis: Float = 1.0
    w_text: Float = 0.0
    layer_start: Int = Field(0, ge=0)
    layer_end: Int | None = Field(None, ge=1, description="exclusive; None: the last decoder layer")
    preserve_norm: bool = Field(False, description="rescale each edited position to its norm before the edit")
    steer_prefix: bool = Field(False, description="also add the mean question edit to every earlier position (additive only)")
    task_vector: list[list[Float]] | None = Field(
        None, description="task_vector mode: one row per decoder layer; calibration computes it (fusion.json), never set by hand"
    )
    calibrate: CalibrationParams = CalibrationParams()

    @model_validator(mode="after")
    def _range_is_ordered(self) -> FusionParams:
        if self.layer_end is not None and self.layer_end <= self.layer_start:
            raise ValueError("layer_end must be greater than layer_start")
        if self.steer_prefix and self.mode != "additive":
            raise ValueError("steer_prefix needs mode additive (it adds the mean question edit a·T − b·V)")
        if self.mode == "task_vector" and (not self.task_vector or self.b != 0):
            raise ValueError(
                "mode task_vector needs the vector calibration computes and b = 0: list task_vector in fusion.calibrate.modes instead"
            )
        return self


class JudgeParams(Section):
    enabled: bool = False
    model: str = "judge"


class EvalParams(Section):
    batch_size: Int = Field(64, ge=1)
    max_new_tokens: Int = Field(8, ge=1)
    bootstrap_samples: Int = Field(1000, ge=0)
    seed: Int = 0
    judge: JudgeParams = JudgeParams()


class PromptParams(Section):
    """How the model is asked to describe an image and to answer over a description (per data set)."""

    describe: str | None = Field(
        None,
        min_length=1,
        description="the describe instruction of describe_then_answer and the perception table; null: the "
        "instruction of the first caption record (what the model was trained to caption with)",
    )
    over_description: str = Field(
        "Scene: {description}\n{question}",  # ShapeTally's text_prompt (vift/data/world.py); a test keeps them equal
        description="a question asked over a description as text ({description} and {question}): "
        "describe_then_answer and the oracle_description row; match your text instructions",
    )

    @model_validator(mode="after")
    def _template_has_both_fields(self) -> PromptParams:
        import string

        try:
            fields = {name for _, name, _, _ in string.Formatter().parse(self.over_description) if name is not None}
        except ValueError as error:
            raise ValueError(f"over_description is not a format string ({error}); braces are written {{{{ }}}}") from None
        if fields != {"description", "question"}:
            raise ValueError(f"over_description must use exactly {{description}} and {{question}}, not {sorted(fields)}")
        return self


class RegistryParams(Section):
    model_name: str | None = Field(None, min_length=1, description="registered model name; null: vift-<data.name>, else vift-<data.source>")
    experiment: str = "vift"
    gate_metric: str = Field(
        "served",
        min_length=1,
        description="the ablation row the champion gate compares; served: the row of the inference mode "
        "calibration chose (vift_unfused, vift_fused or describe_then_answer)",
    )
    margin: Float = Field(0.0, ge=0, description="champion moves only if accuracy beats it by more than this")


class StorageParams(Section):
    """Where ``vift storage push/pull/check`` send and fetch data (the remotes live in .dvc/config).

    No stage depends on this section, so changing it never reruns the pipeline.
    """

    remote: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$",
        description="DVC remote name for vift storage push/pull/check; null: DVC's default remote (core.remote)",
    )


class Params(BaseModel):
    """The whole parameter file."""

    model_config = STRICT

    preset: str = "custom"
    seed: Int = 0
    data: DataParams = DataParams()
    model: ModelParams = ModelParams()
    train: TrainParams = TrainParams()
    fusion: FusionParams = FusionParams()
    eval: EvalParams = EvalParams()
    prompts: PromptParams = PromptParams()
    registry: RegistryParams = RegistryParams()
    storage: StorageParams = StorageParams()

    def registered_model_name(self) -> str:
        """``registry.model_name``, or one derived from the data: a model is named after what it learned."""
        return self.registry.model_name or f"vift-{self.data.name or self.data.source}"
