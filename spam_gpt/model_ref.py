"""One way to name a model everywhere downstream (classify, score, serve).

A reference is a local checkpoint folder, ``runs:/<run id>/<path>``,
``models:/<name>/<version or alias>`` or ``models:/<name>@<alias>``; MLflow references are
downloaded once and the checkpoint inside them found by its ``spam_gpt.json``.
"""

from __future__ import annotations

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
        raise FileNotFoundError(
            f"{folder} is not a spam-gpt checkpoint and holds none (a checkpoint has "
            f"{META_FILE} and model.safetensors); train one with `spam-gpt train --output DIR` "
            "and pass DIR/model"
        )
    return found[0]


def split_registered(ref: str) -> tuple[str, str]:
    """(name, version or alias) of ``models:/NAME/VERSION``, ``models:/NAME/ALIAS`` or
    ``models:/NAME@ALIAS``; the second part is empty for ``models:/NAME``."""
    path = ref.removeprefix("models:/")
    if "@" in path:
        name, _, alias = path.partition("@")
        return name, alias
    name, _, version = path.partition("/")
    return name, version


def alias_of(ref: str) -> tuple[str, str] | None:
    """(name, alias) when ``ref`` names a registered model by an alias that can move."""
    if not ref.startswith("models:/"):
        return None
    name, version = split_registered(ref)
    return None if version.isdigit() or version in ("", "latest") else (name, version)


def model_version_of(ref: str, tracking_uri: str | None) -> tuple[str, str]:
    """(name, version) of an MLflow reference; aliases and ``latest`` resolved to the
    version they point at now."""
    if ref.startswith("runs:/"):
        return ref, ref.split("/")[1]
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    name, version = split_registered(ref)
    if version in ("", "latest"):
        versions = client.search_model_versions(f"name='{name}'")
        if not versions:
            raise FileNotFoundError(f"no registered model named {name!r}")
        return name, str(max(int(v.version) for v in versions))
    if not version.isdigit():
        version = client.get_model_version_by_alias(name, version).version
    client.get_model_version(name, version)  # raises if it does not exist
    return name, str(version)


def resolve_model(
    ref: str, tracking_uri: str | None = None, into: str | None = None
) -> tuple[Path, str, str]:
    """A local checkpoint folder for ``ref``, with the model's name and version; an MLflow
    model is downloaded ``into`` that folder (default: a new temporary one)."""
    if not ref.startswith(MLFLOW_SCHEMES):
        folder = Path(ref).expanduser()
        if not folder.exists():
            raise FileNotFoundError(
                f"model {ref!r} is neither a folder nor a runs:/ or models:/ reference"
            )
        return find_checkpoint(folder), folder.name or "spam-gpt", "local"
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = mlflow_store(tracking_uri)
    try:
        name, version = model_version_of(ref, uri)
        target = into or tempfile.mkdtemp(prefix="spam-gpt-model-")
        # MLflow 3 resolves a version's logged-model source through the process-wide URIs,
        # ignoring the ones passed to download_artifacts: set them.
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        pinned = f"models:/{name}/{version}" if ref.startswith("models:/") else ref
        local = mlflow.artifacts.download_artifacts(artifact_uri=pinned, dst_path=target)
    except (MlflowException, FileNotFoundError) as error:
        raise FileNotFoundError(
            f"cannot load {ref} from MLflow at {uri}: {mlflow_reason(error)}"
        ) from None
    return find_checkpoint(Path(local)), name, str(version)


def load_predictor(ref: str, tracking_uri: str | None = None, **kwargs) -> Predictor:
    """A :class:`Predictor` for any model reference; a download is removed once loaded."""
    with tempfile.TemporaryDirectory(prefix="spam-gpt-model-") as download:
        folder, name, version = resolve_model(ref, tracking_uri, into=download)
        predictor = Predictor.from_checkpoint(str(folder), **kwargs)
    predictor.meta.name, predictor.meta.version = name, version
    return predictor


def pin_model_ref(ref: str, tracking_uri: str | None) -> str:
    """Check the model exists before any work and pin it for workers elsewhere: a local
    path made absolute, an alias or ``latest`` resolved to its version (so it cannot move
    while a job runs)."""
    if not ref.startswith(MLFLOW_SCHEMES):
        folder = Path(ref).expanduser().resolve()
        if not folder.exists():
            raise FileNotFoundError(f"{ref}: no such folder")
        return str(find_checkpoint(folder))
    uri = mlflow_store(tracking_uri)
    if not ref.startswith("models:/"):
        return ref
    from mlflow.exceptions import MlflowException

    try:
        name, version = model_version_of(ref, uri)
    except (MlflowException, FileNotFoundError) as error:
        raise FileNotFoundError(
            f"cannot find {ref} in MLflow at {uri}: {mlflow_reason(error)}"
        ) from None
    return f"models:/{name}/{version}"


def mlflow_reason(error: Exception) -> str:
    """An MLflow error's own message (its str() adds the error code), or the error's."""
    return getattr(error, "message", None) or str(error)


def mlflow_store(tracking_uri: str | None) -> str:
    """The absolute tracking URI for loading a model, refusing an SQLite store that does
    not exist: MLflow would create an empty one in its place and then say only that the
    model is not there."""
    from spam_gpt.tracking import absolute_tracking_uri, answering

    uri = answering(absolute_tracking_uri(tracking_uri))
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        raise FileNotFoundError(
            f"no MLflow store at {uri} (no such file): pass --tracking-uri, or set "
            "MLFLOW_TRACKING_URI, to the store the model was logged to"
        )
    return uri
