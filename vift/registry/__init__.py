"""MLflow tracking and the model registry (see docs/REGISTRY.md).

- :mod:`vift.registry.server`: the tracking server: settings, connection, clear errors, redaction.
- :mod:`vift.registry.outputs`: what gets logged: parameters, lineage tags, stage outputs.
- :mod:`vift.registry.tracking`: one MLflow run per pipeline run; ``stage_run`` wraps each stage.
- :mod:`vift.registry.pyfunc`: the registered pyfunc model (HF checkpoint + processor + fusion.json).
- :mod:`vift.registry.gate`: registration of a run's model, the candidate/champion alias gate.
- :mod:`vift.registry.loaded`: loading a registered model back (``models:/<name>@<alias>``).
- :mod:`vift.registry.cli`: ``vift predict`` against ``models:/<name>@champion``.

Nothing here imports MLflow at package import time.
"""
