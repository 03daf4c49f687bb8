"""MLflow tracking and the model registry (see docs/REGISTRY.md).

- :mod:`vift.registry.tracking`: one MLflow run per pipeline run; ``stage_run`` wraps each stage.
- :mod:`vift.registry.pyfunc`: the registered pyfunc model (HF checkpoint + processor + fusion.json).
- :mod:`vift.registry.gate`: registration of a run's model, the candidate/champion alias gate.
- :mod:`vift.registry.cli`: ``vift predict`` against ``models:/<name>@champion``.

Nothing here imports MLflow at package import time.
"""
