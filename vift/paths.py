"""The workspace layout, defined once. Paths are relative to the workspace (the repository root)."""

from __future__ import annotations

from pathlib import Path

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
ABLATION_MD = REPORTS_DIR / "ablation.md"
PREDICTIONS_DIR = REPORTS_DIR / "predictions"
MLFLOW_DB = Path("mlflow.db")
STATE_DIR = Path(".vift")  # git-ignored workspace state: run record, locks
IMPORT_LOCK = STATE_DIR / "import.lock"


def manifest(split: str) -> Path:
    return DATA_DIR / f"{split}.jsonl"
