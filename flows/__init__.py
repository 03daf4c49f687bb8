"""Prefect flows and deployments: thin wrappers that run the DVC stages."""
