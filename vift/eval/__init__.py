"""Evaluation: answering the eval splits, the ablation with its controls, reports and plots."""
