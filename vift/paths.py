"""The workspace layout, defined once. Paths are relative to the workspace (the repository root)."""

from __future__ import annotations

from pathlib import Path

# The stage graph's names in pipeline order, defined once: dvc.yaml's stages, the `vift stage`
# modules, the Prefect flow and the tracking code all follow this tuple (tests check they agree).
STAGES: tuple[str, ...] = ("data", "base", "train_caption", "train_text", "train_vit", "calibrate", "evaluate", "register")
# Training stage name -> attribute of ``params.train``.
TRAINING_STAGES: dict[str, str] = {"train_caption": "caption", "train_text": "text", "train_vit": "vit"}

DATA_DIR = Path("data") / "benchmark"
MODELS_DIR = Path("models")
BASE_MODEL = MODELS_DIR / "base"
CAPTION_MODEL = MODELS_DIR / "caption"
VIFT_MODEL = MODELS_DIR / "vift"
VIT_MODEL = MODELS_DIR / "vit"
REPORTS_DIR = Path("reports")
PLOTS_DIR = REPORTS_DIR / "plots"
BASE_REPORT = REPORTS_DIR / "base.json"
FUSION_JSON = MODELS_DIR / "fusion.json"
METRICS_JSON = REPORTS_DIR / "metrics.json"
HEADLINE_JSON = REPORTS_DIR / "headline.json"  # the DVC metric: a few numbers per experiment
ABLATION_MD = REPORTS_DIR / "ablation.md"
PREDICTIONS_DIR = REPORTS_DIR / "predictions"
REGISTRATION_JSON = REPORTS_DIR / "registration.json"
MLFLOW_DB = Path("mlflow.db")
STATE_DIR = Path(".vift")  # git-ignored workspace state: run record, locks
IMPORT_LOCK = STATE_DIR / "import.lock"
RUN_RECORD = STATE_DIR / "mlflow_run.json"  # the MLflow run the workspace's pipeline is filling
RUN_LOCK = STATE_DIR / "mlflow_run.lock"
DVC_LOCK = Path("dvc.lock")


def manifest(split: str) -> Path:
    return DATA_DIR / f"{split}.jsonl"
