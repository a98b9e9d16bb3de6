"""Model Registry: one registered model per flavor, versions matched by tags, aliases instead of stages."""

from __future__ import annotations

import mlflow
from mlflow.entities.model_registry import ModelVersion
from mlflow.tracking import MlflowClient


def register(model_uri: str, name: str, tags: dict, alias: str | None, description: str = "") -> ModelVersion:
    """Register `model_uri` as a new version of `name` (created if missing), tag it, point `alias` at it."""
    version = mlflow.register_model(model_uri, name, tags={k: str(v) for k, v in tags.items()})
    client = MlflowClient()
    if description:
        client.update_model_version(name, version.version, description=description)
    if alias:
        client.set_registered_model_alias(name, alias, version.version)
    return version
