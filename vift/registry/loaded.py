"""Registered models, loaded back: ``models:/<name>@<alias>`` (or ``/<version>``) from the tracking server.

:func:`load_registered` is the one way vift loads a registered model (``vift predict``, and
``vift eval --model models:/...``): it resolves the version (so callers can report it), turns a
missing model or alias into a UserError that says what to run, and loads the pyfunc model.
"""

from __future__ import annotations

from vift.errors import UserError
from vift.registry.server import connect, guard, redact, using_tracking_uri
from vift.registry.tracking import is_missing


def _resolve_version(client, uri: str) -> dict:
    """``{"name", "version", "run_id"}`` of a ``models:/name@alias`` or ``models:/name/version`` URI."""
    rest = uri[len("models:/") :] if uri.startswith("models:/") else None
    if not rest:
        return {}
    if "@" in rest:
        name, alias = rest.split("@", 1)
        version = client.get_model_version_by_alias(name, alias)
    elif "/" in rest:
        name, number = rest.split("/", 1)
        version = client.get_model_version(name, number)
    else:
        return {}
    return {"name": name, "version": str(version.version), "run_id": version.run_id}


def load_registered(model_uri: str):
    """(pyfunc model, version info) for ``model_uri`` on the configured tracking server."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from vift.settings import tracking_uri

    uri = tracking_uri()
    client = connect(uri)
    with using_tracking_uri(uri):
        with guard(uri, f"resolve {model_uri}"):
            try:
                info = _resolve_version(client, model_uri)
            except MlflowException as error:
                if is_missing(error, invalid_parameter=True):
                    raise UserError(
                        f"{model_uri}: no such registered model version on {redact(uri)}; run `vift stage register` "
                        f"(or `dvc repro`) against this tracking URI, or check the name and alias"
                        + (
                            f". A version that does not beat its controls is only @candidate (reports/registration.json "
                            f"says why): --model {model_uri.rsplit('@', 1)[0]}@candidate serves it anyway"
                            if model_uri.endswith("@champion")
                            else ""
                        )
                    ) from None
                raise
        with guard(uri, f"load {model_uri}"):
            model = mlflow.pyfunc.load_model(model_uri)
    return model, info
