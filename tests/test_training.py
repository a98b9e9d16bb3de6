from dataclasses import replace

import numpy as np
import pytest
import torch

from cifar10_cnn import augment, checkpoints, hardware, models, optimizers, recipes, synthetic, training
from cifar10_cnn.errors import UserError

# Tests train as on a CPU without native bf16 (fp32), whatever CPU runs them: the same numbers everywhere.
NO_BF16_CPU = hardware.Capabilities("cpu", "test CPU", native_bf16=False)


def data(n=320, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    return torch.from_numpy(synthetic.images_for(labels, rng)), torch.from_numpy(labels).long()


def snapshots(saved: list, config):
    """An on_checkpoint that keeps each epoch's checkpoint as the train step would log it."""
    return lambda net, history, state: saved.append(checkpoints.snapshot(net, config, history, state))


def fit(config, images, labels):
    config, _ = hardware.decide(config, NO_BF16_CPU)
    net = models.build(config.model, seed=config.seed)
    return net, training.train(net, images, labels, config, torch.device("cpu"))


def test_same_seed_same_loss_curve_and_weights():
    images, labels = data()
    config = recipes.TrainConfig(epochs=2, batch_size=32, seed=3)
    net_a, a = fit(config, images, labels)
    net_b, b = fit(config, images, labels)
    assert [r.loss for r in a] == [r.loss for r in b]
    assert all(torch.equal(x, y) for x, y in zip(net_a.state_dict().values(), net_b.state_dict().values(), strict=True))
    _, c = fit(recipes.TrainConfig(epochs=2, batch_size=32, seed=4), images, labels)
    assert [r.loss for r in c] != [r.loss for r in a]


def test_training_learns_and_reports_each_epoch():
    images, labels = data()
    seen = []
    net = models.build("simple_cnn", seed=0)
    config = recipes.TrainConfig(epochs=3, batch_size=16, learning_rate=3e-3)
    history = training.train(net, images, labels, config, torch.device("cpu"), on_epoch=seen.append)
    assert [r.epoch for r in history] == [1, 2, 3] and seen == history
    assert history[-1].loss < history[0].loss < 2.4
    assert history[-1].accuracy > 0.8  # the synthetic classes are easy; chance is 0.1


def test_partial_last_batch_is_used():
    images, labels = data(n=50)
    config, _ = hardware.decide(recipes.TrainConfig(epochs=1, batch_size=32), NO_BF16_CPU)
    saved = []
    history = training.train(models.build(config.model, seed=config.seed), images, labels, config,
                             torch.device("cpu"), on_checkpoint=snapshots(saved, config))
    steps = {int(s["step"]) for s in saved[0]["optimizer"]["state"].values()}
    assert steps == {2}  # 32 images, then the other 18: two Adam steps, not one
    assert history[0].accuracy * 50 == pytest.approx(round(history[0].accuracy * 50))  # counted over all 50
    assert history[0].images_per_s > 0 and 0 <= history[0].accuracy <= 1


def test_divergence_stops_training_with_a_message():
    images, labels = data()
    config = recipes.TrainConfig(epochs=3, batch_size=32, learning_rate=1e9)
    with pytest.raises(training.Diverged, match=r"training diverged: the loss became (nan|inf).*lower learning_rate"):
        fit(config, images, labels)


def test_checkpoint_rebuilds_the_same_network():
    images, labels = data(n=64)
    config = recipes.TrainConfig(epochs=1)
    net, history = fit(config, images, labels)
    ckpt = checkpoints.snapshot(net, config, history)
    rebuilt, config_back = checkpoints.rebuild(ckpt)
    assert config_back == config
    with torch.inference_mode():
        x = models.normalize(images[:8])
        assert torch.equal(rebuilt(x), net.eval()(x))
    with pytest.raises(UserError, match=f"checkpoint format 0 is not {checkpoints.FORMAT}; retrain"):
        checkpoints.rebuild({**ckpt, "format": 0})


@pytest.mark.parametrize("cuda, mps, expected", [(True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")])
def test_device_selection(monkeypatch, cuda, mps, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    assert hardware.select_device("auto") == torch.device(expected)  # CUDA, then MPS, then the CPU
    assert hardware.select_device("cpu") == torch.device("cpu")
    if not cuda:
        with pytest.raises(UserError, match="device 'cuda' was requested but torch sees no CUDA GPU"):
            hardware.select_device("cuda")
    if not mps:
        with pytest.raises(UserError, match="device 'mps' was requested but the Apple MPS backend"):
            hardware.select_device("mps")


def test_our_adam_is_bit_for_bit_the_seeds_default_adam():
    """The default recipe must compute the seed's update: PyTorch's default (per-tensor) Adam."""
    images, labels = data(n=128)
    config = recipes.TrainConfig(epochs=1, batch_size=32)
    ours, _ = fit(config, images, labels)
    ref = models.build("simple_cnn", seed=config.seed)
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
    out = augment.flip_crop(images, 2, torch.Generator().manual_seed(0))
    assert out.shape == images.shape and out.dtype == torch.uint8
    padded = torch.nn.functional.pad(images.float(), (2, 2, 2, 2), mode="reflect").to(torch.uint8)
    flips = 0
    for pad, got in zip(padded, out, strict=True):
        windows = [pad[:, dy : dy + 8, dx : dx + 8] for dy in range(5) for dx in range(5)]
        plain = any(torch.equal(got, w) for w in windows)
        flipped = any(torch.equal(got, w.flip(2)) for w in windows)
        assert plain or flipped
        flips += flipped and not plain
    assert 15 < flips < 49  # about half are flipped
    assert not torch.equal(out, images)
    again = augment.flip_crop(images, 2, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)  # the generator alone decides


@pytest.mark.parametrize("schedule", ["constant", "onecycle", "cosine"])
def test_learning_rate_schedules(schedule):
    config = recipes.TrainConfig(epochs=4, lr_schedule=schedule, warmup_epochs=1)
    factor = optimizers.lr_factor(config, steps_per_epoch=10)
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
    images, labels = data(n=320)
    config = recipes.RECIPES["fast"]
    config = replace(config, epochs=3, batch_size=64, learning_rate=0.2, warmup_epochs=1)
    _, history = fit(config, images, labels)
    assert history[-1].loss < history[0].loss
    assert history[-1].accuracy > 0.5


def test_resume_reaches_the_same_weights_as_an_uninterrupted_run(monkeypatch):
    """Resumed after epoch 1 and after epoch 4 (inside the lookahead, after the stem's bias froze): the
    same losses and bit for bit the same weights as the run that was never interrupted."""
    monkeypatch.setattr(optimizers, "LOOKAHEAD_EVERY_IMAGES", 64)  # a pull every 2 steps of 32
    images, labels = data(n=128)
    config, _ = hardware.decide(replace(recipes.RECIPES["fast"], epochs=5, batch_size=32, warmup_epochs=1,
                                        lookahead=True), NO_BF16_CPU)  # Muon's state and the average, resumed
    assert config.lookahead and optimizers.LOOKAHEAD_START_EPOCH < 4 <= config.epochs
    saved = []
    straight = models.build(config.model, seed=config.seed)
    history = training.train(straight, images, labels, config, torch.device("cpu"),
                             on_checkpoint=snapshots(saved, config))
    assert [len(c["history"]) for c in saved] == [1, 2, 3, 4, 5]
    for resume_after in (1, 4):
        ckpt = torch.load(_roundtrip(saved[resume_after - 1]), weights_only=True)  # as it comes back from the store
        fresh = models.build(config.model)  # a new process: different init, same checkpoint
        resumed = training.train(fresh, images, labels, config, torch.device("cpu"), resume=ckpt)
        assert [r.loss for r in resumed] == [r.loss for r in history], resume_after
        assert all(torch.equal(a, b) for a, b in zip(straight.state_dict().values(), fresh.state_dict().values(),
                                                       strict=True)), resume_after


def _roundtrip(obj):
    import io

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return buffer


def test_train_refuses_an_undecided_precision():
    with pytest.raises(ValueError, match="decide precision and channels_last"):
        training.train(models.build("airnet"), *data(n=32), recipes.RECIPES["fast"], torch.device("cpu"))


def test_triangle_schedule_rises_from_a_fifth_and_ends_at_seven_percent():
    config = recipes.TrainConfig(epochs=10, lr_schedule="triangle", warmup_epochs=2.3)
    factor = optimizers.lr_factor(config, steps_per_epoch=10)
    values = [factor(s) for s in range(101)]
    assert values[0] == pytest.approx(0.2) and values[23] == pytest.approx(1.0) and values[100] == pytest.approx(0.07)
    assert all(a < b for a, b in zip(values[:23], values[1:24], strict=True))
    assert all(a > b for a, b in zip(values[23:100], values[24:101], strict=True))


def test_a_longer_or_shorter_training_stretches_the_schedule():
    """What a time budget does: the warm-up keeps its share of the steps, the end its value."""
    config = recipes.TrainConfig(epochs=10, lr_schedule="triangle", warmup_epochs=2.5)
    for total in (35, 100, 240):
        factor = optimizers.lr_factor(config, steps_per_epoch=10, total=total)
        assert factor(round(total / 4)) == pytest.approx(1.0)
        assert factor(total) == pytest.approx(0.07)


def test_parameter_groups_batch_norm_rate_and_frozen_whitening():
    config = recipes.RECIPES["fast"]
    net = models.build("airnet")
    groups = {g["name"]: g for g in optimizers.param_groups(net, config)}
    assert set(groups) == {"weights", "norm", "stem_bias"}  # BN scales are frozen; the stem's weight too
    assert groups["norm"]["lr"] == config.learning_rate * 64
    # decayed per step as much as the weights: lr x wd is the same in both groups
    assert groups["norm"]["lr"] * groups["norm"]["weight_decay"] == pytest.approx(
        config.learning_rate * config.weight_decay)
    assert groups["weights"]["weight_decay"] == config.weight_decay
    assert all(p.ndim > 1 for p in groups["weights"]["params"])
    assert groups["stem_bias"]["params"][0] is net.stem.bias
    # the seed's recipe: one group, as the seed's own optimizer had
    seed = optimizers.make_optimizer(models.build("simple_cnn"), recipes.TrainConfig())
    assert len(seed.param_groups) == 1


def test_whitening_bias_learns_for_its_epochs_then_stays():
    images, labels = data(n=128)
    config, _ = hardware.decide(replace(recipes.RECIPES["fast"], epochs=5, batch_size=32, warmup_epochs=1,
                                        lookahead=False), NO_BF16_CPU)
    saved = []
    net = models.build(config.model, seed=config.seed)
    training.train(net, images, labels, config, torch.device("cpu"), on_checkpoint=snapshots(saved, config))
    bias = [c["state_dict"]["stem.bias"] for c in saved]
    frozen_after = models.AirNet.stem_bias_epochs
    assert not torch.equal(bias[0], bias[1])  # still learning
    assert all(torch.equal(bias[frozen_after - 1], b) for b in bias[frozen_after:])


def test_lookahead_pulls_the_network_onto_the_running_average():
    net = torch.nn.Linear(2, 2)
    lookahead = optimizers.Lookahead(net)
    start = net.weight.detach().clone()
    with torch.no_grad():
        net.weight.add_(1.0)
    lookahead.pull(net, decay=0.75)  # average = 0.75 old + 0.25 new, and the network takes it
    assert torch.allclose(net.weight, start + 0.25)
    with torch.no_grad():
        net.weight.add_(1.0)
    lookahead.pull(net, decay=1.0)  # decay 1: the network falls back onto the average
    assert torch.allclose(net.weight, start + 0.25)


def test_flip_crop_mirrors_exactly_the_images_it_is_told_to():
    images = torch.randint(0, 256, (6, 3, 5, 5), dtype=torch.uint8)
    flip = torch.tensor([True, False, True, False, False, True])
    out = augment.flip_crop(images, 0, torch.Generator().manual_seed(0), flip)
    for img, got, mirrored in zip(images, out, flip, strict=True):
        assert torch.equal(got, img.flip(2) if mirrored else img)


def test_budget_plan_fits_the_measured_steps_into_the_minutes(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(training.time, "perf_counter", lambda: clock[0])

    def step_on(i, rng, probe, optimizer):  # each probe step "takes" 2 s, the first (set-up) 5 s
        clock[0] += 5.0 if i == 0 else 2.0
        return torch.zeros(()), None, None

    config = replace(recipes.RECIPES["fast"], budget_minutes=1.0)
    plan = training.plan_budget(config, 10, 100.0, step_on, models.build("airnet"))
    # 60 s - 11 s of measuring = 49 s left, 2 s a step: 24 steps, the third epoch partial
    assert (plan.total_steps, plan.epochs, plan.step_seconds, plan.measure_seconds) == (24, 3, 2.0, 11.0)
    small = training.plan_budget(replace(config, budget_minutes=0.1), 10, 100.0, step_on, models.build("airnet"))
    assert small.total_steps == 10  # never less than one epoch


def test_a_budget_ends_training_inside_an_epoch(monkeypatch):
    images, labels = data(n=256)
    config, _ = hardware.decide(replace(recipes.RECIPES["fast"], batch_size=64, budget_minutes=1.0), NO_BF16_CPU)
    monkeypatch.setattr(training, "plan_budget", lambda config, steps, *a: training.Plan(steps + 2, steps, 1.0, 3.0))
    plans, saved = [], []
    history = training.train(models.build(config.model, seed=config.seed), images, labels, config,
                             torch.device("cpu"), on_plan=plans.append, on_checkpoint=snapshots(saved, config))
    assert plans == [training.Plan(6, 4, 1.0, 3.0)] and len(history) == 2
    assert saved[-1]["total_steps"] == 6 and saved[-1]["scheduler"]["last_epoch"] == 6


def test_orthogonalize_evens_out_the_singular_values():
    from cifar10_cnn.muon import orthogonalize

    g = torch.randn(64, 3 * 3 * 32) * torch.logspace(-1, 0, 64)[:, None]  # rows of very different sizes
    for m in (g, g.T):
        s = torch.linalg.svdvals(orthogonalize(m))
        assert orthogonalize(m).shape == m.shape and 0.3 < s.min() and s.max() < 1.6, s


def test_muon_steps_filters_by_a_fixed_fraction_and_the_rest_as_sgd():
    torch.manual_seed(0)
    net = models.build("airnet")
    config = replace(recipes.RECIPES["fast"], optimizer="muon", filter_lr=0.05, weight_decay=1e-3)
    optimizer = optimizers.make_optimizer(net, config)
    assert [g["name"] for g in optimizer.param_groups][0] == "filters"
    assert {g["name"] for g in optimizer.param_groups} >= {"norm", "weights", "stem_bias"}
    twin = models.build("airnet")
    twin.load_state_dict(net.state_dict())
    reference = torch.optim.SGD(optimizers.param_groups(twin, config), lr=config.learning_rate,
                                momentum=config.momentum, nesterov=True)
    for _ in range(2):  # the same gradients into both, twice: momentum and weight decay included
        for a, b in zip(net.parameters(), twin.parameters(), strict=True):
            if a.requires_grad:
                a.grad = torch.randn_like(a)
                b.grad = a.grad.clone()
        before = net.blocks[1].conv1.weight.detach().clone()
        optimizer.step()
        reference.step()
    conv = net.blocks[1].conv1.weight.detach()
    rescaled = before * len(before) ** 0.5 / before.norm()  # Muon first puts the bank back to norm sqrt(out)
    step = (conv - rescaled).norm() / rescaled.norm()
    assert step.item() == pytest.approx(0.05, rel=0.5)  # about filter_lr of its norm
    for (name, a), b in zip(net.named_parameters(), twin.parameters(), strict=True):
        if a.ndim != 4 and a.requires_grad:  # batch norm, head, whitening bias: torch's Nesterov SGD exactly
            assert torch.allclose(a, b, atol=1e-6), name
