"""`auto` precision and memory format: pinned for machines the suite does not run on, by their capabilities."""

from dataclasses import replace

import pytest
import torch

from cifar10_cnn import hardware, recipes

ZEN3 = hardware.Capabilities("cpu", "AMD EPYC (Zen 3)", native_bf16=False, features=("avx2",))
ZEN4 = hardware.Capabilities("cpu", "AMD EPYC (Zen 4)", native_bf16=True,
                             features=("avx2", "avx512", "avx512_bf16", "vnni"))
SAPPHIRE_RAPIDS = hardware.Capabilities("cpu", "Intel Xeon", native_bf16=True, features=("avx512", "amx"))
H100 = hardware.Capabilities("cuda", "NVIDIA H100", native_bf16=True, features=("sm90",))
T4 = hardware.Capabilities("cuda", "Tesla T4", native_bf16=False, features=("sm75",))
MPS = hardware.Capabilities("mps", "Apple GPU (MPS)", native_bf16=False)
FAST = recipes.RECIPES["fast"]


@pytest.mark.parametrize("caps,precision", [(ZEN3, "fp32"), (T4, "fp32"), (MPS, "fp32"),
                                            (ZEN4, "bf16"), (SAPPHIRE_RAPIDS, "bf16"), (H100, "bf16")])
def test_fast_recipe_takes_bf16_only_where_the_device_computes_it(caps, precision):
    config, why = hardware.decide(FAST, caps)
    assert config.precision == precision
    assert why["precision"].startswith("auto: ") and ("natively" in why["precision"]) == (precision == "bf16")
    assert "warning" not in why


@pytest.mark.parametrize("caps", [ZEN3, ZEN4, H100])
def test_channels_last_for_the_convolutional_networks_on_cpu_and_cuda(caps):
    assert hardware.decide(FAST, caps)[0].channels_last is True
    assert hardware.decide(replace(FAST, model="simple_cnn"), caps)[0].channels_last is False
    assert hardware.decide(FAST, MPS)[0].channels_last is False


@pytest.mark.parametrize("caps", [ZEN3, ZEN4, H100])
def test_the_seed_recipe_is_never_changed(caps):
    config, why = hardware.decide(recipes.RECIPES["seed"], caps)
    assert config == recipes.RECIPES["seed"] and why == {}
    assert (config.precision, config.channels_last) == ("fp32", False)


def test_explicit_bf16_without_native_support_runs_with_one_warning():
    config, why = hardware.decide(replace(FAST, precision="bf16"), ZEN3)
    assert config.precision == "bf16"  # what was asked for, explicitly
    assert set(why) == {"warning", "channels_last"}
    assert "no native bf16" in why["warning"] and "precision=auto picks fp32" in why["warning"]
    assert hardware.decide(replace(FAST, precision="bf16"), ZEN4)[1].keys() == {"channels_last"}


@pytest.mark.parametrize("machine,onednn,avx512_bf16,amx,native", [
    ("x86_64", False, False, False, False),  # Zen 3: AVX2 only
    ("x86_64", True, False, False, False),  # Skylake-X: oneDNN emulates bf16 on plain AVX-512
    ("x86_64", True, True, False, True),  # Zen 4, Cooper Lake
    ("x86_64", True, False, True, True),  # Sapphire Rapids: AMX
    ("aarch64", True, False, False, True),  # Graviton 3: oneDNN says yes only with BF16
    ("aarch64", False, False, False, False),
])
def test_cpu_capability_query(monkeypatch, machine, onednn, avx512_bf16, amx, native):
    monkeypatch.setattr(hardware.platform, "machine", lambda: machine)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: onednn)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    caps = hardware.cpu_capabilities()
    assert caps.native_bf16 is native
    assert ("avx512_bf16" in caps.features) is avx512_bf16 and ("amx" in caps.features) is amx
    assert hardware.decide(FAST, caps)[0].precision == ("bf16" if native else "fp32")


def test_this_machine_is_described_with_its_features():
    caps = hardware.capabilities(torch.device("cpu"))
    text = hardware.describe(caps)
    assert text.startswith(f"cpu {caps.name} (") and "bf16)" in text and f"{torch.get_num_threads()} threads" in text
