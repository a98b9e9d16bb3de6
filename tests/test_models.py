import pytest
import torch

from cifar10_cnn import models


def test_simple_cnn_is_the_seed_network():
    net = models.build("simple_cnn")
    assert models.count_parameters(net) == 62_006
    shapes = [tuple(p.shape) for p in net.parameters()]
    assert shapes == [(6, 3, 5, 5), (6,), (16, 6, 5, 5), (16,), (120, 400), (120,), (84, 120), (84,), (10, 84), (10,)]
    assert net(torch.zeros(7, 3, 32, 32)).shape == (7, 10)


def test_normalize_is_the_seeds_to_tensor_and_normalize():
    x = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    seed = (x.float() / 255.0 - 0.5) / 0.5
    assert torch.allclose(models.normalize(x), seed, atol=1e-6)
    assert models.normalize(torch.tensor([0, 255], dtype=torch.uint8).view(1, 1, 2, 1).expand(1, 3, 2, 1)).tolist() == [
        [[[-1.0], [1.0]]] * 3
    ]


def test_raw_pixel_classifier_takes_nhwc_uint8():
    torch.manual_seed(0)
    net = models.build("simple_cnn").eval()
    nchw = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    with torch.inference_mode():
        expected = net(models.normalize(nchw))
        got = models.RawPixelClassifier(net)(nchw.permute(0, 2, 3, 1).contiguous())
    assert torch.allclose(got, expected, atol=1e-5)


def test_unknown_model_name():
    with pytest.raises(ValueError, match="unknown model 'vgg99'; choose one of simple_cnn"):
        models.build("vgg99")
