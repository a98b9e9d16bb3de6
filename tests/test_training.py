import numpy as np
import pytest
import torch

from cifar10_cnn import models, synthetic, training
from cifar10_cnn.errors import UserError


def data(n=320, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    return torch.from_numpy(synthetic.images_for(labels, rng)), torch.from_numpy(labels).long()


def fit(config, images, labels):
    training.seed_everything(config.seed)
    net = models.build(config.model)
    return net, training.train(net, images, labels, config, torch.device("cpu"))


def test_same_seed_same_loss_curve_and_weights():
    images, labels = data()
    config = training.TrainConfig(epochs=2, batch_size=32, seed=3)
    net_a, a = fit(config, images, labels)
    net_b, b = fit(config, images, labels)
    assert [r.loss for r in a] == [r.loss for r in b]
    assert all(torch.equal(x, y) for x, y in zip(net_a.state_dict().values(), net_b.state_dict().values(), strict=True))
    _, c = fit(training.TrainConfig(epochs=2, batch_size=32, seed=4), images, labels)
    assert [r.loss for r in c] != [r.loss for r in a]


def test_training_learns_and_reports_each_epoch():
    images, labels = data()
    seen = []
    training.seed_everything(0)
    net = models.build("simple_cnn")
    config = training.TrainConfig(epochs=3, batch_size=16, learning_rate=3e-3)
    history = training.train(net, images, labels, config, torch.device("cpu"), on_epoch=seen.append)
    assert [r.epoch for r in history] == [1, 2, 3] and seen == history
    assert history[-1].loss < history[0].loss < 2.4
    assert history[-1].accuracy > 0.8  # the synthetic classes are easy; chance is 0.1


def test_partial_last_batch_is_used():
    images, labels = data(n=50)
    _, history = fit(training.TrainConfig(epochs=1, batch_size=32), images, labels)
    assert history[0].images_per_s > 0 and 0 <= history[0].accuracy <= 1


def test_divergence_stops_training_with_a_message():
    images, labels = data()
    config = training.TrainConfig(epochs=3, batch_size=32, learning_rate=1e9)
    with pytest.raises(training.Diverged, match=r"training diverged: the loss became (nan|inf).*lower learning_rate"):
        fit(config, images, labels)


def test_checkpoint_rebuilds_the_same_network():
    images, labels = data(n=64)
    config = training.TrainConfig(epochs=1)
    net, history = fit(config, images, labels)
    ckpt = training.checkpoint(net, config, {}, history)
    rebuilt, config_back = training.rebuild(ckpt)
    assert config_back == config
    with torch.inference_mode():
        x = models.normalize(images[:8])
        assert torch.equal(rebuilt(x), net.eval()(x))
    with pytest.raises(UserError, match="checkpoint format 0 is not 1"):
        training.rebuild({**ckpt, "format": 0})


def test_device_selection():
    assert training.select_device("cpu") == torch.device("cpu")
    assert training.select_device("auto").type in ("cpu", "cuda", "mps")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="device 'cuda' was requested but torch sees no CUDA GPU"):
            training.select_device("cuda")


def test_our_adam_is_bit_for_bit_the_seeds_default_adam():
    """The default recipe must compute the seed's update: PyTorch's default (per-tensor) Adam."""
    images, labels = data(n=128)
    config = training.TrainConfig(epochs=1, batch_size=32)
    ours, _ = fit(config, images, labels)
    training.seed_everything(config.seed)
    ref = models.build("simple_cnn")
    optimizer = torch.optim.Adam(ref.parameters(), lr=config.learning_rate, foreach=False)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(config.seed))
    for i in range(0, len(labels), config.batch_size):
        idx = order[i : i + config.batch_size]
        loss = torch.nn.functional.cross_entropy(ref(models.normalize(images[idx])), labels[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), ref.state_dict().values(), strict=True))
