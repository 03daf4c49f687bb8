"""vift: visual instruction-free fine-tuning (ViFT) of vision-language models as a pipeline."""

__version__ = "0.1.0"
