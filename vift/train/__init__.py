"""Training stages: mixture, sampler, Trainer, checkpoints, launch, reports."""
