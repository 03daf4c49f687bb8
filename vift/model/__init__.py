"""Models: the offline tiny LVLM, loading of any HF LVLM checkpoint."""

from vift.model.loading import check_checkpoint, decoder_layers, load_model, load_processor
from vift.model.tiny import build_tiny_lvlm

__all__ = ["build_tiny_lvlm", "check_checkpoint", "decoder_layers", "load_model", "load_processor"]
