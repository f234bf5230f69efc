"""engine/accel.py: where the model trains channels_last, the --compile checks, and that a compiled model keeps
its outputs, gradients, state_dict keys and deep-copyability (what the EMA and checkpoints need)."""
from __future__ import annotations

import copy
import shutil

import pytest
import torch
import torch.nn as nn

from engine.accel import check_compile, compile_model, train_channels_last
from models.common import Conv
from models.norm import make_norm_builder
from utils.general import ConfigError


def test_channels_last_on_cpu_and_cuda_unless_overridden() -> None:
    assert train_channels_last(torch.device("cpu")) and train_channels_last(torch.device("cuda", 0))
    assert not train_channels_last(torch.device("meta"))
    assert not train_channels_last(torch.device("cpu"), override=False)
    assert train_channels_last(torch.device("meta"), override=True)


def test_compile_without_a_cpp_compiler_is_a_one_line_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(ConfigError, match=r"^--compile on CPU needs a C\+\+ compiler"):
        check_compile(torch.device("cpu"))


def test_compile_on_cuda_without_triton_is_a_one_line_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.utils._triton as triton_probe

    monkeypatch.setattr(triton_probe, "has_triton", lambda: False)
    with pytest.raises(ConfigError, match=r"^--compile on CUDA needs Triton"):
        check_compile(torch.device("cuda", 0))


def test_compiled_model_matches_eager_and_keeps_its_state_dict() -> None:
    try:
        check_compile(torch.device("cpu"))
    except ConfigError as e:
        pytest.skip(str(e))
    torch.manual_seed(0)
    eager = nn.Sequential(Conv(3, 8, 3, 2, norm=make_norm_builder("gn:C/4")),
                          Conv(8, 8, 3, 1, norm=make_norm_builder("bn"))).train()
    model = copy.deepcopy(eager)
    keys = list(model.state_dict())
    compile_model(model, torch.device("cpu"))
    x = torch.randn(2, 3, 16, 16)
    from torch._dynamo.utils import counters

    counters.clear()
    y_eager, y = eager(x), model(x)
    assert counters["stats"]["unique_graphs"] >= 1  # dynamo captured the forward, not an eager fallback
    torch.testing.assert_close(y, y_eager, atol=1e-5, rtol=1e-4)
    y.square().sum().backward()
    y_eager.square().sum().backward()
    for p, q in zip(model.parameters(), eager.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(model[1].norm.running_mean, eager[1].norm.running_mean)  # BN statistics still update
    assert list(model.state_dict()) == keys  # in place: no '_orig_mod.' prefix in checkpoints
    twin = copy.deepcopy(model)  # the EMA's copy
    torch.testing.assert_close(twin.eval()(x), eager.eval()(x), atol=1e-5, rtol=1e-4)
