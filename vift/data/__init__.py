"""Data: the ShapeTally world, manifest formats and streaming loaders."""

from vift.data.generate import EVAL_SPLITS, SPLITS, TRAIN_SPLITS, generate_shapetally, training_corpus
from vift.data.manifests import ConversationRecord, Manifest, VQARecord

__all__ = [
    "EVAL_SPLITS",
    "SPLITS",
    "TRAIN_SPLITS",
    "ConversationRecord",
    "Manifest",
    "VQARecord",
    "generate_shapetally",
    "training_corpus",
]
