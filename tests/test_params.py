import pytest

from cifar10_cnn import params
from cifar10_cnn.errors import UserError


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: params.positive_int("epochs", "0"), "epochs must be a whole number >= 1, got '0'"),
        (lambda: params.positive_int("epochs", "abc"), "epochs must be a whole number >= 1, got 'abc'"),
        (lambda: params.positive_int("batch_size", "-3"), "batch_size must be a whole number >= 1, got '-3'"),
        (lambda: params.positive_float("learning_rate", "0"), "learning_rate must be a finite number > 0, got '0'"),
        (lambda: params.positive_float("learning_rate", "nan"), "learning_rate must be a finite number > 0"),
        (lambda: params.positive_float("learning_rate", "x"), "learning_rate must be a number > 0, got 'x'"),
        (lambda: params.non_negative_int("seed", "-1"), "seed must be a whole number >= 0, got '-1'"),
        (lambda: params.choice("device", "tpu", params.DEVICES), "device must be one of auto, cpu, cuda, mps"),
        (lambda: params.run_id("train_run_id", "xyz"), "train_run_id must be an MLflow run id"),
        (lambda: params.model_name("bad name!"), "model_name must be 1-100 letters"),
        (lambda: params.expected_records("5"), "expected_records must be 'TRAIN,TEST'"),
    ],
)
def test_bad_values_name_the_parameter(call, message):
    with pytest.raises(UserError) as err:
        call()
    assert message in str(err.value)


def test_good_values():
    assert params.positive_int("epochs", " 5 ") == 5
    assert params.positive_float("learning_rate", "1e-3") == 0.001
    assert params.choice("device", "CPU", params.DEVICES) == "cpu"
    assert params.expected_records("any") is None
    assert params.expected_records("50000,10000") == {"train": 50000, "test": 10000}
