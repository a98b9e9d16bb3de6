from dataclasses import replace

import numpy as np
import pytest
import torch

from cifar10_cnn import models, recipes, synthetic, training
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
    with pytest.raises(UserError, match=f"checkpoint format 0 is not {training.CHECKPOINT_FORMAT}; retrain"):
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


def test_flip_crop_takes_windows_of_the_padded_image():
    images = torch.randint(1, 256, (64, 3, 8, 8), dtype=torch.uint8)
    out = training.flip_crop(images, 2, torch.Generator().manual_seed(0))
    assert out.shape == images.shape and out.dtype == torch.uint8
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    flips = 0
    for pad, got in zip(padded, out, strict=True):
        windows = [pad[:, dy : dy + 8, dx : dx + 8] for dy in range(5) for dx in range(5)]
        plain = any(torch.equal(got, w) for w in windows)
        flipped = any(torch.equal(got, w.flip(2)) for w in windows)
        assert plain or flipped
        flips += flipped and not plain
    assert 15 < flips < 49  # about half are flipped
    assert not torch.equal(out, images)
    again = training.flip_crop(images, 2, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)  # the generator alone decides


@pytest.mark.parametrize("schedule", ["constant", "onecycle", "cosine"])
def test_learning_rate_schedules(schedule):
    config = training.TrainConfig(epochs=4, lr_schedule=schedule, warmup_epochs=1)
    factor = training.lr_factor(config, steps_per_epoch=10)
    values = [factor(s) for s in range(40)]
    assert values[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])  # linear warm-up to the peak
    if schedule == "constant":
        assert values[10:] == [1.0] * 30
    else:
        decay = values[10:]
        assert decay[0] == 1.0 and all(a > b for a, b in zip(decay, decay[1:], strict=False)) and decay[-1] < 0.05
    if schedule == "cosine":
        assert values[25] == pytest.approx(0.5)  # half-way through the decay


def test_fast_recipe_features_train_and_learn():
    images, labels = data(n=640)
    config = recipes.RECIPES["fast"]
    config = replace(config, epochs=4, batch_size=64, learning_rate=0.2, warmup_epochs=1)
    _, history = fit(config, images, labels)
    assert history[-1].loss < history[0].loss
    assert history[-1].accuracy > 0.5


def test_resume_reaches_the_same_weights_as_an_uninterrupted_run():
    images, labels = data(n=256)
    config = replace(recipes.RECIPES["fast"], epochs=3, batch_size=64, warmup_epochs=1, precision="fp32")
    straight, history = fit(config, images, labels)
    saved = []
    training.seed_everything(config.seed)
    net = models.build(config.model)
    training.train(net, images, labels, replace(config), torch.device("cpu"), on_checkpoint=saved.append)
    assert [len(c["history"]) for c in saved] == [1, 2, 3]
    ckpt = torch.load(_roundtrip(saved[0]), weights_only=True)  # as it would come back from the store
    fresh = models.build(config.model)  # a new process: different init, same checkpoint
    resumed = training.train(fresh, images, labels, config, torch.device("cpu"), resume=ckpt)
    assert [r.loss for r in resumed] == [r.loss for r in history]
    assert all(torch.equal(a, b) for a, b in zip(straight.state_dict().values(), fresh.state_dict().values(),
                                                   strict=True))


def _roundtrip(obj):
    import io

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return buffer
