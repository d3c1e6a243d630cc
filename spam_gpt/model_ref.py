"""One way to name a model everywhere downstream (classify, score, serve).

A reference is a local checkpoint folder, ``runs:/<run id>/<path>`` or
``models:/<name>/<version or alias>``; MLflow references are downloaded once and the
checkpoint inside them found by its ``spam_gpt.json``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from spam_gpt.checkpoint import META_FILE, is_checkpoint
from spam_gpt.predictor import Predictor

MLFLOW_SCHEMES = ("runs:/", "models:/")


def find_checkpoint(folder: Path) -> Path:
    """The checkpoint in a downloaded artifact tree (a pyfunc model keeps it under
    ``artifacts/``)."""
    if is_checkpoint(folder):
        return folder
    found = sorted(p.parent for p in folder.rglob(META_FILE) if is_checkpoint(p.parent))
    if not found:
        raise FileNotFoundError(f"no spam-gpt checkpoint inside {folder}")
    return found[0]


def model_version_of(ref: str, tracking_uri: str | None) -> tuple[str, str]:
    """(name, version) for display: aliases are resolved to the version they point at."""
    if ref.startswith("runs:/"):
        return ref, ref.split("/")[1]
    name, _, version = ref.removeprefix("models:/").partition("/")
    if version and not version.isdigit():
        from mlflow import MlflowClient

        version = MlflowClient(tracking_uri).get_model_version_by_alias(name, version).version
    return name, version or "latest"


def resolve_model(ref: str, tracking_uri: str | None = None) -> tuple[Path, str, str]:
    """A local checkpoint folder for ``ref``, with the model's name and version."""
    if not ref.startswith(MLFLOW_SCHEMES):
        folder = Path(ref).expanduser()
        if not folder.exists():
            raise FileNotFoundError(
                f"model {ref!r} is neither a folder nor a runs:/ or models:/ reference"
            )
        return find_checkpoint(folder), folder.name or "spam-gpt", "local"
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri is None:
        from spam_gpt.tracking import default_tracking_uri

        uri = default_tracking_uri()
    try:
        name, version = model_version_of(ref, uri)
        target = tempfile.mkdtemp(prefix="spam-gpt-model-")
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=ref, dst_path=target, tracking_uri=uri
        )
    except MlflowException as error:
        raise FileNotFoundError(
            f"cannot load {ref} from MLflow at {uri}: {error.message}"
        ) from None
    return find_checkpoint(Path(local)), name, str(version)


def load_predictor(ref: str, tracking_uri: str | None = None, **kwargs) -> Predictor:
    """A :class:`Predictor` for any model reference."""
    folder, name, version = resolve_model(ref, tracking_uri)
    predictor = Predictor.from_checkpoint(str(folder), **kwargs)
    predictor.meta.name, predictor.meta.version = name, version
    return predictor
