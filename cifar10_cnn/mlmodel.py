"""How the models are logged: MLflow's own flavor (pytorch or onnx) with our pyfunc in front of it.

`mlflow.pytorch.load_model` / `mlflow.onnx.load_model` give the plain network as MLflow saved it;
`mlflow.pyfunc.load_model` and `mlflow models serve` go through `serving.py`, which checks the pixels
and answers with class names and probabilities.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import mlflow
from mlflow.models import Model

from . import constants as C
from . import serving
from .logs import quiet

LOADER_MODULE = "cifar10_serving"  # the name serving.py has inside a logged model's code/ folder


class _Flavor:
    """A flavor "module" for `Model.log`: MLflow's save_model, then our pyfunc in place of MLflow's."""

    def __init__(self, save_model, backend: str, model_file: str, class_names, max_batch: int):
        self._save = save_model
        self.config = {"backend": backend, "file": model_file, "class_names": list(class_names), "max_batch": max_batch}

    def save_model(self, path, mlflow_model: Model, **kwargs):
        with tempfile.TemporaryDirectory() as tmp:
            code = Path(tmp) / f"{LOADER_MODULE}.py"
            shutil.copyfile(serving.__file__, code)
            self._save(path=path, mlflow_model=mlflow_model, code_paths=[str(code)], **kwargs)
        Path(path, serving.CONFIG_FILE).write_text(json.dumps(self.config, indent=2))
        pyfunc = mlflow_model.flavors["python_function"]
        pyfunc["loader_module"] = LOADER_MODULE
        pyfunc.pop("data", None)  # our loader gets the model folder and reads CONFIG_FILE there
        # No input schema: the scoring server would cast requests to uint8 before our checks run.
        # The signature as the network sees it stays in the model's metadata.
        if mlflow_model.signature is not None:
            mlflow_model.metadata = {**(mlflow_model.metadata or {}),
                                     "network_signature": mlflow_model.signature.to_dict()}
        mlflow_model.signature = None
        mlflow_model.save(str(Path(path, "MLmodel")))


def log_pytorch(model, name: str, signature, example, class_names, metadata: dict, pip_requirements: list[str]):
    flavor = _Flavor(mlflow.pytorch.save_model, "pytorch", "data", class_names, C.MAX_REQUEST_IMAGES)
    return _log(flavor, name, metadata, pytorch_model=model, signature=signature, input_example=example,
                pip_requirements=pip_requirements, serialization_format="pt2")


def log_onnx(proto, name: str, signature, example, class_names, metadata: dict, pip_requirements: list[str]):
    flavor = _Flavor(mlflow.onnx.save_model, "onnx", "model.onnx", class_names, C.MAX_REQUEST_IMAGES)
    return _log(flavor, name, metadata, onnx_model=proto, signature=signature, input_example=example,
                pip_requirements=pip_requirements, save_as_external_data=False,
                onnx_execution_providers=["CPUExecutionProvider"])


def _log(flavor: _Flavor, name: str, metadata: dict, **kwargs):
    # MLflow warns that a model without signature cannot be checked; ours checks its own input.
    with quiet("mlflow.models.model"):
        return Model.log(artifact_path=None, name=name, flavor=flavor, metadata=metadata, **kwargs)
