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
from mlflow.models import Model, ModelSignature

from . import constants as C
from . import images, serving, tracking
from .logs import quiet

LOADER_MODULE = "cifar10_serving"  # the name serving.py has inside a logged model's code/ folder
IMAGES_MODULE = "cifar10_images"  # and images.py, which it imports there under this name
PYTORCH_DATA = "data"  # where mlflow.pytorch.save_model puts the network in a model folder
PYTORCH_PROGRAM = f"{PYTORCH_DATA}/model.pt2"  # and the torch.export program there (pt2 format)


class _Flavor:
    """A flavor "module" for `Model.log`: MLflow's save_model, then our pyfunc in place of MLflow's."""

    def __init__(self, save_model, backend: str, model_file: str, class_names, max_batch: int):
        self._save = save_model
        self.config = {"backend": backend, "file": model_file, "class_names": list(class_names), "max_batch": max_batch}

    def save_model(self, path, mlflow_model: Model, **kwargs):
        kwargs.pop("validate_serving_input", None)  # for Model.log, not for the flavor's save_model
        with tempfile.TemporaryDirectory() as tmp:
            code = [Path(tmp) / f"{LOADER_MODULE}.py", Path(tmp) / f"{IMAGES_MODULE}.py"]
            shutil.copyfile(serving.__file__, code[0])
            shutil.copyfile(images.__file__, code[1])
            self._save(path=path, mlflow_model=mlflow_model, code_paths=[str(c) for c in code], **kwargs)
        Path(path, serving.CONFIG_FILE).write_text(json.dumps(self.config, indent=2))
        pyfunc = mlflow_model.flavors["python_function"]
        pyfunc["loader_module"] = LOADER_MODULE
        pyfunc.pop("data", None)  # our loader gets the model folder and reads CONFIG_FILE there
        # No input schema: the scoring server would cast requests to uint8 before our checks run, and a
        # column schema refuses raw pixels (serving.py). The output schema lets spark_udf find its result
        # type. The signature as the network sees it stays in the model's metadata.
        if mlflow_model.signature is not None:
            mlflow_model.metadata = {**(mlflow_model.metadata or {}),
                                     "network_signature": mlflow_model.signature.to_dict()}
        mlflow_model.signature = ModelSignature(inputs=None, outputs=output_schema())
        mlflow_model.save(str(Path(path, "MLmodel")))


def output_schema():
    """What serving.table gives: one row per image."""
    from mlflow.types.schema import Array, ColSpec, Schema

    return Schema([ColSpec("string", "class"), ColSpec("long", "class_index"), ColSpec("double", "probability"),
                   ColSpec(Array("double"), "probabilities")])


def base_version(version: str) -> str:
    return version.split("+")[0]  # '2.14.1+cu130' -> '2.14.1': local labels don't resolve on PyPI


def model_metadata(class_names) -> dict:
    """What a logged model takes and gives, stored in its MLmodel file."""
    return {"class_names": list(class_names),
            "input": f"a column '{serving.IMAGE_COLUMN}' of base64-encoded image files (PNG, JPEG, ...), or uint8 "
                     f"RGB pixels [batch, 32, 32, 3] (NHWC), 0..255; at most {C.MAX_REQUEST_IMAGES} per request",
            "output": "pyfunc: one row per image with class, class_index, probability, probabilities; "
                      f"the network itself: {C.SERVING_OUTPUT} float32 [batch, {C.NUM_CLASSES}]"}


def log_pytorch(model, example, class_names):
    """The PyTorch flavor (a torch.export program) of `model` (uint8 NHWC in, logits out), with its
    signature from `example` (uint8 NHWC; >= 2 images, or torch.export fixes the batch at 1)."""
    import torch
    from mlflow.models import infer_signature

    with torch.inference_mode():
        logits = model(torch.from_numpy(example)).numpy()
    flavor = _Flavor(mlflow.pytorch.save_model, "pytorch", PYTORCH_DATA, class_names, C.MAX_REQUEST_IMAGES)
    return _log(flavor, C.PYTORCH_MODEL_NAME, model_metadata(class_names), pytorch_model=model,
                signature=infer_signature(example, logits), input_example=example,
                pip_requirements=[f"torch=={base_version(torch.__version__)}", *_common_requirements()],
                serialization_format="pt2",
                # MLflow would load the program again to try the example; the export step loads it back
                # itself and checks it against the checkpoint on every test image.
                validate_serving_input=False)


def pytorch_program(info):
    """The torch.export program of a PyTorch flavor logged by `log_pytorch`, loaded back from its file."""
    import torch

    location = mlflow.get_logged_model(info.model_id).artifact_location.rstrip("/")
    with tempfile.TemporaryDirectory(prefix="cifar10-download-") as folder:
        return torch.export.load(tracking.download(f"{location}/{PYTORCH_PROGRAM}", folder))


def log_onnx(proto, name: str, example, logits, class_names):
    """An ONNX flavor: `example` uint8 NHWC images and the `logits` the model gives for them.

    The signature is explicit: with only a uint8 example, MLflow's JSON round trip turns it into int64
    and the model would be logged with no signature at all.
    """
    import onnx
    import onnxruntime
    from mlflow.models import infer_signature

    flavor = _Flavor(mlflow.onnx.save_model, "onnx", "model.onnx", class_names, C.MAX_REQUEST_IMAGES)
    return _log(flavor, name, model_metadata(class_names), onnx_model=proto,
                signature=infer_signature(example, logits), input_example=example,
                pip_requirements=[f"onnx=={onnx.__version__}", f"onnxruntime=={onnxruntime.__version__}",
                                  *_common_requirements()],
                save_as_external_data=False, onnx_execution_providers=["CPUExecutionProvider"])


def _common_requirements() -> list[str]:
    import PIL

    return [f"mlflow=={mlflow.__version__}", f"pillow=={PIL.__version__}"]  # pillow: images.py decodes uploads


def _log(flavor: _Flavor, name: str, metadata: dict, **kwargs):
    # MLflow warns that a model without signature cannot be checked; ours checks its own input.
    with quiet("mlflow.models.model"):
        return Model.log(artifact_path=None, name=name, flavor=flavor, metadata=metadata, **kwargs)
