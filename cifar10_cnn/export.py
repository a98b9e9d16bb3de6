"""ONNX export with the onnxscript-based (dynamo) exporter, checked and compared with PyTorch."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
import torch

from . import constants as C
from .logs import quiet


def to_onnx(model: torch.nn.Module | torch.export.ExportedProgram, example: torch.Tensor) -> onnx.ModelProto:
    """Export `model` (uint8 NHWC in, logits out) with a symbolic batch dimension, and check the graph.

    `model` is a module (traced here) or a torch.export program (converted as it is: the PyTorch
    flavor's, so both flavors come from one trace). The example batch must hold at least 2 images:
    with 1, the exporter specializes the batch to 1.
    """
    if example.shape[0] < 2:
        raise ValueError("export needs an example batch of at least 2 images")
    if isinstance(model, torch.export.ExportedProgram):
        dynamic_shapes = None  # the program's own
    else:
        model, dynamic_shapes = model.eval(), {"images": {0: torch.export.Dim("batch")}}
    # The exporter warns once per torchvision operator it cannot register when torchvision is absent;
    # we use none of them.
    with quiet("torch.onnx._internal.exporter._registration"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's deprecation chatter is not actionable here
            program = torch.onnx.export(
                model,
                (example,),
                dynamo=True,
                input_names=[C.SERVING_INPUT],
                output_names=[C.SERVING_OUTPUT],
                dynamic_shapes=dynamic_shapes,
                verbose=False,
            )
    proto = program.model_proto
    onnx.checker.check_model(proto, full_check=True)
    if proto.graph.input[0].type.tensor_type.shape.dim[0].HasField("dim_value"):
        raise ValueError("the exported model has a fixed batch size; trace it with a batch of at least 2")
    return proto


def session(proto: onnx.ModelProto, threads: int | None = None):
    """An ONNX Runtime session with `threads` intra-op threads; by default torch's count, so that a step
    given a share of the cores (OMP_NUM_THREADS) keeps to it in both runtimes."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = torch.get_num_threads() if threads is None else threads
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


Predictor = Callable[[np.ndarray], np.ndarray]  # uint8 NHWC batch -> float32 logits


def onnx_predictor(ort_session) -> Predictor:
    return lambda batch: ort_session.run([C.SERVING_OUTPUT], {C.SERVING_INPUT: batch})[0]


def torch_predictor(model) -> Predictor:
    def predict(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(batch)).numpy()

    return predict


@dataclass(frozen=True)
class Parity:
    images: int
    max_abs_diff: float  # largest |logit_candidate - logit_reference| over every image and class
    argmax_mismatches: int  # images whose predicted class differs
    max_abs_logit: float = 0.0  # largest |logit_reference|: float32 rounding grows with it

    @property
    def tolerance(self) -> float:
        """C.ONNX_MAX_ABS_DIFF for logits up to 1 in size, relative to the largest logit beyond that."""
        return C.ONNX_MAX_ABS_DIFF * max(1.0, self.max_abs_logit)

    @property
    def ok(self) -> bool:
        return self.argmax_mismatches == 0 and self.max_abs_diff <= self.tolerance


def outputs(predictor: Predictor, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """The predictor's logits for every uint8 NHWC image, in batches: one pass, reused for every check."""
    return np.concatenate([predictor(np.ascontiguousarray(images[i : i + batch_size]))
                           for i in range(0, len(images), batch_size)])


def parity(expected: np.ndarray, got: np.ndarray) -> Parity:
    """How far the logits `got` disagree with the logits `expected` of the same images."""
    return Parity(len(expected), float(np.abs(got - expected).max()),
                  int((got.argmax(1) != expected.argmax(1)).sum()), float(np.abs(expected).max()))


def compare(reference: Predictor, candidate: Predictor, images: np.ndarray) -> Parity:
    """Run uint8 NHWC `images` through both predictors; report how far they disagree."""
    return parity(outputs(reference, images), outputs(candidate, images))


def quantize_int8(proto: onnx.ModelProto, calibration: np.ndarray, batch_size: int = 100) -> onnx.ModelProto:
    """ONNX Runtime static INT8 quantization (QDQ, per-channel 7-bit weights), calibrated on uint8 NHWC images."""
    import tempfile
    from pathlib import Path

    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Batches(CalibrationDataReader):
        def __init__(self):
            self._batches = iter(range(0, len(calibration), batch_size))

        def get_next(self):
            start = next(self._batches, None)
            return None if start is None else {C.SERVING_INPUT: calibration[start : start + batch_size]}

    with quiet(""):  # the quantizer warns on the root logger about every batch-norm weight
        with tempfile.TemporaryDirectory() as tmp:
            source, prepared, target = (str(Path(tmp) / n) for n in ("float.onnx", "prepared.onnx", "int8.onnx"))
            onnx.save(proto, source)
            # ONNX shape inference and graph clean-up, as ORT recommends; its symbolic pass fails on our reshape.
            quant_pre_process(source, prepared, skip_symbolic_shape=True)
            # reduce_range: 7-bit weights. x86 CPUs without VNNI multiply u8 x s8 pairs into int16 and
            # saturate (ONNX Runtime's docs; what the full range cost on such a CPU is in
            # docs/models-and-recipes.md). Always on, so the model does not depend on the machine that
            # quantized it.
            quantize_static(prepared, target, Batches(), quant_format=QuantFormat.QDQ, per_channel=True,
                            reduce_range=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
            quantized = onnx.load(target)
    onnx.checker.check_model(quantized)
    return quantized


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(1) == labels).mean())


def call_times(fn: Predictor, batch: np.ndarray, calls: int, warmup: int = 1) -> list[float]:
    """Wall seconds of each of `calls` calls `fn(batch)`, after `warmup` untimed ones."""
    import time

    for _ in range(warmup):
        fn(batch)
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn(batch)
        times.append(time.perf_counter() - start)
    return times


def median_seconds(predictor: Predictor, batch: np.ndarray, repeats: int) -> float:
    return float(np.median(call_times(predictor, batch, repeats)))
