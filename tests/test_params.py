import pytest

from cifar10_cnn import params, recipes
from cifar10_cnn.errors import UserError


@pytest.mark.parametrize(
    "name, value, message",
    [
        ("epochs", "0", "epochs must be a whole number >= 1, got '0'"),
        ("epochs", "abc", "epochs must be a whole number >= 1, got 'abc'"),
        ("batch_size", "-1", "batch_size must be a whole number >= 1, got '-1'"),
        ("learning_rate", "0", "learning_rate must be a finite number > 0, got '0'"),
        ("learning_rate", "nan", "learning_rate must be a finite number > 0, got 'nan'"),
        ("learning_rate", "x", "learning_rate must be a finite number > 0, got 'x'"),
        ("model", "vgg99", "model must be one of simple_cnn, vgg11, vgg16, resnet18, fastnet, airnet, airnet94; "
                           "got 'vgg99'"),
        ("optimizer", "rmsprop", "optimizer must be one of adam, sgd, muon; got 'rmsprop'"),
        ("lr_schedule", "step", "lr_schedule must be one of constant, onecycle, cosine, triangle; got 'step'"),
        ("label_smoothing", "1.5", "label_smoothing must be a number in [0, 1), got '1.5'"),
        ("weight_decay", "-1", "weight_decay must be a finite number >= 0, got '-1'"),
        ("augment", "maybe", "augment must be true or false, got 'maybe'"),
        ("precision", "fp16", "precision must be one of fp32, bf16; got 'fp16'"),
        ("momentum", "1", "momentum must be a number in [0, 1), got '1'"),
        ("bias_lr_scale", "0", "bias_lr_scale must be a finite number > 0, got '0'"),
        ("lookahead", "often", "lookahead must be true or false, got 'often'"),
        ("crop_padding", "-2", "crop_padding must be a whole number in [0, 31], got '-2'"),
        ("crop_padding", "32", "crop_padding must be a whole number in [0, 31], got '32'"),  # mirrored past the edge
        ("alternating_flip", "2", "alternating_flip must be true or false, got '2'"),
        ("budget_minutes", "-5", "budget_minutes must be a finite number >= 0, got '-5'"),
        ("budget_minutes", "inf", "budget_minutes must be a finite number >= 0, got 'inf'"),
        ("seed", "-1", "seed must be a whole number >= 0, got '-1'"),
        ("filter_lr", "-0.1", "filter_lr must be a finite number > 0, got '-0.1'"),
        ("warmup", "1", "unknown training parameter 'warmup'"),
    ],
)
def test_every_bad_hyperparameter_is_named_by_its_declared_check(name, value, message):
    with pytest.raises(UserError) as err:
        recipes.parse(name, value)
    assert message in str(err.value)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: params.choice("device", "tpu", params.DEVICES), "device must be one of auto, cpu, cuda, mps"),
        (lambda: params.choice("recipe", "slow", tuple(recipes.RECIPES)), "recipe must be one of seed, fast, fast94"),
        (lambda: params.run_id("resume_run_id", "abc"), "resume_run_id must be an MLflow run id (32 hex characters)"),
        (lambda: params.model_name("bad name!"), "model_name must be 1-100 letters"),
        (lambda: params.model_name("mine-onnx"), "'mine-onnx' ends in '-onnx', which the ONNX models' names add"),
        (lambda: params.expected_records("5"), "expected_records must be 'TRAIN,TEST'"),
        (lambda: params.POSITIVE_INT("nproc_per_node", "0"), "nproc_per_node must be a whole number >= 1"),
        (lambda: recipes.resolve("seed", {"warmup_epochs": "6"}), "warmup_epochs (6.0) is longer than the training"),
        (lambda: recipes.resolve("seed", {"optimizer": "sgd", "momentum": "0"}), "momentum must be above 0 with "
                                                                                 "optimizer sgd"),
    ],
)
def test_bad_step_arguments_name_the_parameter(call, message):
    with pytest.raises(UserError) as err:
        call()
    assert message in str(err.value)


def test_good_values():
    assert params.POSITIVE_INT("epochs", " 5 ") == 5
    assert params.POSITIVE("learning_rate", "1e-3") == 0.001
    assert params.FRACTION("momentum", "0") == 0.0
    assert params.choice("device", "CPU", params.DEVICES) == "cpu"
    assert params.expected_records("any") is None
    assert params.expected_records("50000,10000") == {"train": 50000, "test": 10000}
    assert recipes.explicit({"epochs": "auto", "augment": "yes", "lr_schedule": "Cosine"}) == {
        "augment": True, "lr_schedule": "cosine"}


def test_every_hyperparameter_declares_a_check_and_help_and_its_default_passes_the_check():
    for name, spec in recipes.SPECS.items():
        assert spec["help"] and callable(spec["check"]) and spec["check"].describe(), name
        default = getattr(recipes.TrainConfig(), name)
        assert spec["check"](name, str(default).lower()) == default, name
