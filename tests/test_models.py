import numpy as np
import pytest
import torch

from cifar10_cnn import models, recipes


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
    with pytest.raises(ValueError, match="unknown model 'vgg99'; choose one of simple_cnn, vgg11"):
        models.build("vgg99")


# The usual CIFAR variants (e.g. kuangliu/pytorch-cifar) minus the conv biases that batch norm makes
# redundant: VGG11 9,231,114 - 2,752; VGG16 14,728,266 - 4,224; ResNet-18 has none to remove.
# airnet94 is airbench94's network: its 1,971,640 parameters and our 1,152 fixed batch-norm scales.
@pytest.mark.parametrize("name,count", [("vgg11", 9_228_362), ("vgg16", 14_724_042), ("resnet18", 11_173_962),
                                        ("fastnet", 656_760), ("airnet", 569_656), ("airnet94", 1_972_792)])
def test_every_model_maps_a_batch_to_ten_logits(name, count):
    net = models.build(name)
    assert models.count_parameters(net) == count
    assert net(torch.zeros(3, 3, 32, 32)).shape == (3, 10)


def test_recipes_know_every_model():
    assert set(recipes.MODEL_NAMES) == set(models.MODELS)


def test_resnet18_keeps_full_resolution_in_its_first_stage():
    net = models.build("resnet18")
    out = net.stages[0](net.stem(torch.zeros(1, 3, 32, 32)))
    assert out.shape == (1, 64, 32, 32)  # 3x3 stem, no max-pool: the CIFAR variant


def test_fastnet_stem_whitens_image_patches():
    rng = np.random.default_rng(0)
    # Correlated channels and neighbouring pixels, like real images.
    base = rng.normal(0, 1, (400, 1, 33, 33))
    images = base[:, :, :32, :32] + 0.5 * base[:, :, 1:, 1:] + 0.2 * rng.normal(0, 1, (400, 3, 32, 32))
    images = torch.from_numpy(images).float()
    net = models.build("fastnet")
    weights_before = net.stem.weight.clone()
    net.init_from_data(images, eps=0.0)
    assert not torch.equal(weights_before, net.stem.weight) and not net.stem.weight.requires_grad
    with torch.no_grad():
        out = torch.nn.functional.conv2d(images, net.stem.weight[:12])  # [N, 12, 31, 31]
    flat = out.permute(0, 2, 3, 1).reshape(-1, 12)
    flat = flat - flat.mean(0)
    covariance = flat.T @ flat / len(flat)
    assert torch.allclose(covariance, torch.eye(12), atol=1e-3)
    assert torch.equal(net.stem.weight[12:], -net.stem.weight[:12])


def test_airnet_blocks_start_as_identities_with_a_fixed_batch_norm_scale():
    net = models.build("airnet")
    block = net.blocks[1]  # 64 -> 128 channels
    x = torch.randn(2, 64, 6, 6)
    with torch.no_grad():
        assert torch.allclose(block.conv1(x)[:, :64], x)  # its first 64 filters pass the input through
        assert torch.allclose(block.conv2(torch.cat([x, x], 1)), torch.cat([x, x], 1))
    assert not block.bn1.weight.requires_grad and block.bn1.bias.requires_grad
    assert block.bn1.momentum == 0.4  # fast statistics: the lookahead averages the weights under them
