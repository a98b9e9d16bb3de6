import numpy as np
import torch
import torch.nn.functional as F

from cifar10_cnn import evaluation


def test_metrics_from_known_logits():
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    predicted = torch.tensor([0, 1, 1, 1, 0, 2])
    logits = F.one_hot(predicted, 3).float() * 5
    result = evaluation.evaluate(logits, labels, 3)
    assert result.accuracy == 4 / 6
    assert result.per_class_accuracy == [0.5, 1.0, 0.5]
    assert result.confusion.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert np.isclose(result.loss, F.cross_entropy(logits, labels).item())


def test_predict_logits_batches_and_concatenates():
    calls = []

    def model(x):
        calls.append(len(x))
        return x.float().sum(dim=(1, 2, 3))[:, None].repeat(1, 10)

    images = torch.ones(25, 3, 2, 2, dtype=torch.uint8)
    out = evaluation.predict_logits(model, images, batch_size=10)
    assert calls == [10, 10, 5] and out.shape == (25, 10) and out.dtype == torch.float32


def test_one_pass_gives_the_plain_logits_and_the_augmented_ones():
    torch.manual_seed(0)
    net = torch.nn.Linear(3 * 6 * 6, 10)
    autocast_on = []

    def model(x):  # NHWC uint8 -> logits
        autocast_on.append(torch.is_autocast_enabled("cpu"))
        return net(x.float().flatten(1))

    images = torch.randint(0, 255, (10, 6, 6, 3), dtype=torch.uint8)

    def shifted(d):  # moved d pixels down and right, the edge mirrored in: reflect padding, then a crop
        padded = F.pad(images.permute(0, 3, 1, 2).float(), (1, 1, 1, 1), mode="reflect")
        return padded[:, :, 1 - d : 7 - d, 1 - d : 7 - d].permute(0, 2, 3, 1).to(torch.uint8)

    def mirror(x):
        return (model(x) + model(x.flip(2))) / 2

    with torch.no_grad():
        crops = (mirror(images) + (mirror(shifted(1)) + mirror(shifted(-1))) / 2) / 2
        expected = {"flip": mirror(images), "crops": crops}
        for level in ("false", "flip", "crops"):
            plain, augmented = evaluation.plain_and_tta_logits(model, images, level, 1, 2, batch_size=4)
            assert torch.allclose(plain, model(images))
            assert augmented is None if level == "false" else torch.allclose(augmented, expected[level], atol=1e-5)
            assert torch.allclose(evaluation.with_tta(model, level, 1, 2)(images),
                                  model(images) if level == "false" else expected[level], atol=1e-5)
    # Under the training's precision, the augmented views run in it and the plain pass does not.
    autocast_on.clear()
    evaluation.plain_and_tta_logits(model, images, "flip", 1, 2, torch.autocast("cpu", dtype=torch.bfloat16), 10)
    assert autocast_on == [False, True, True]
