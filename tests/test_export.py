import numpy as np
import onnx
import pytest
import torch

from cifar10_cnn import constants as C
from cifar10_cnn import export, models


@pytest.fixture(scope="module")
def exported():
    torch.manual_seed(0)
    model = models.RawPixelClassifier(models.build("simple_cnn")).eval()
    example = torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8)
    # As the export step does: the program MLflow's PyTorch flavor holds (batch left to torch.export), converted.
    program = torch.export.export(model, (example,), dynamic_shapes=[{0: torch.export.Dim.AUTO}])
    return model, export.to_onnx(program, example)


def test_graph_takes_uint8_nhwc_with_a_symbolic_batch(exported):
    _, proto = exported
    (inp,) = proto.graph.input
    assert inp.name == C.SERVING_INPUT
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    dims = inp.type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [32, 32, 3]
    assert [o.name for o in proto.graph.output] == [C.SERVING_OUTPUT]


@pytest.mark.parametrize("batch", [1, 7, 256])
def test_onnx_runtime_matches_pytorch_at_any_batch(exported, batch):
    model, proto = exported
    images = np.random.default_rng(batch).integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8)
    parity = export.compare(export.torch_predictor(model), export.onnx_predictor(export.session(proto)), images)
    assert parity.images == batch and parity.argmax_mismatches == 0
    assert parity.max_abs_diff < C.ONNX_MAX_ABS_DIFF


def test_compare_sees_a_different_model(exported):
    model, proto = exported
    torch.manual_seed(1)
    other = models.RawPixelClassifier(models.build("simple_cnn")).eval()
    images = np.random.default_rng(0).integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    parity = export.compare(export.torch_predictor(other), export.onnx_predictor(export.session(proto)), images)
    assert parity.max_abs_diff > C.ONNX_MAX_ABS_DIFF


def test_export_refuses_a_batch_of_one(exported):
    model, _ = exported
    with pytest.raises(ValueError, match="at least 2 images"):
        export.to_onnx(model, torch.zeros(1, 32, 32, 3, dtype=torch.uint8))
    fixed = torch.export.export(model, (torch.zeros(2, 32, 32, 3, dtype=torch.uint8),))  # batch fixed at 2
    with pytest.raises(ValueError, match="fixed batch size"):
        export.to_onnx(fixed, torch.zeros(2, 32, 32, 3, dtype=torch.uint8))


@pytest.mark.parametrize("name", ["vgg11", "vgg16", "resnet18", "fastnet", "airnet"])
def test_every_model_exports_with_parity(name):
    torch.manual_seed(0)
    net = models.build(name)
    if hasattr(net, "init_from_data"):
        net.init_from_data(models.normalize(torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)))
    with torch.no_grad():  # batch-norm statistics as after training, so eval mode is not an identity
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 2.0)
    model = models.RawPixelClassifier(net).eval()
    proto = export.to_onnx(model, torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8))
    images = np.random.default_rng(1).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    parity = export.compare(export.torch_predictor(model), export.onnx_predictor(export.session(proto)), images)
    assert parity.argmax_mismatches == 0 and parity.max_abs_diff < C.ONNX_MAX_ABS_DIFF


def test_parity_tolerance_grows_with_the_logits():
    small = export.Parity(images=5, max_abs_diff=5e-4, argmax_mismatches=0, max_abs_logit=0.5)
    assert small.ok and small.tolerance == C.ONNX_MAX_ABS_DIFF
    large = export.Parity(images=5, max_abs_diff=0.05, argmax_mismatches=0, max_abs_logit=400.0)
    assert large.ok and large.tolerance == pytest.approx(0.4)
    assert not export.Parity(images=5, max_abs_diff=0.5, argmax_mismatches=0, max_abs_logit=400.0).ok
    assert not export.Parity(images=5, max_abs_diff=0.0, argmax_mismatches=1, max_abs_logit=1.0).ok


def test_int8_weights_use_seven_bits_and_calibration_is_deterministic(exported):
    """7-bit weights (reduce_range): x86 CPUs without VNNI saturate u8 x s8 products at 8 bits."""
    _, proto = exported
    calibration = np.random.default_rng(0).integers(0, 256, (200, 32, 32, 3), dtype=np.uint8)
    quantized = export.quantize_int8(proto, calibration)
    weights = [onnx.numpy_helper.to_array(t) for t in quantized.graph.initializer
               if t.data_type == onnx.TensorProto.INT8 and t.name.endswith("weight_quantized")]
    assert len(weights) == 5 and all(np.abs(w.astype(int)).max() == 64 for w in weights)  # 8 bits would reach 127
    again = export.quantize_int8(proto, calibration)
    assert again.SerializeToString() == quantized.SerializeToString()  # the same images give the same model
