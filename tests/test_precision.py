"""aligntk.precision on its own: which device ``auto`` picks, missing devices, autocast dtype and scaler."""

from __future__ import annotations

import contextlib

import pytest
import torch

from aligntk import AligntkError
from aligntk.precision import Precision, resolve_device


def _devices(monkeypatch: pytest.MonkeyPatch, cuda: bool, mps: bool) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)


@pytest.mark.parametrize(
    ("cuda", "mps", "expected"),
    [(True, True, torch.device("cuda", 1)), (False, True, torch.device("mps")), (False, False, torch.device("cpu"))],
)
def test_auto_prefers_cuda_then_mps_then_cpu(
    monkeypatch: pytest.MonkeyPatch, cuda: bool, mps: bool, expected: torch.device
) -> None:
    _devices(monkeypatch, cuda, mps)
    assert resolve_device("auto", local_rank=1) == expected


def test_named_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    _devices(monkeypatch, cuda=False, mps=False)
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(AligntkError) as info:
        resolve_device("cuda")
    assert str(info.value) == "train.device: cuda was asked for but no CUDA device is available"
    with pytest.raises(AligntkError) as info:
        resolve_device("mps")
    assert str(info.value) == "train.device: mps was asked for but MPS is not available"
    _devices(monkeypatch, cuda=True, mps=False)
    assert resolve_device("cuda", local_rank=3) == torch.device("cuda", 3)  # one GPU per torchrun process


@pytest.mark.parametrize(
    ("name", "dtype", "scaled"),
    [("fp32", torch.float32, False), ("bf16", torch.bfloat16, False), ("fp16", torch.float16, True)],
)
def test_autocast_dtype_and_scaler(name: str, dtype: torch.dtype, scaled: bool) -> None:
    precision = Precision(name, torch.device("cpu"))
    assert precision.dtype == (None if name == "fp32" else dtype)
    assert isinstance(precision.scaler, torch.amp.GradScaler) if scaled else precision.scaler is None
    a, b = torch.randn(4, 8), torch.randn(8, 2)
    with precision.autocast():
        assert torch.is_autocast_enabled("cpu") == (name != "fp32")
        assert (a @ b).dtype == dtype
    assert (a @ b).dtype == torch.float32  # only inside the context
    if name == "fp32":
        assert isinstance(precision.autocast(), contextlib.nullcontext)


def test_bf16_on_a_gpu_without_it_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    with pytest.raises(AligntkError) as info:
        Precision("bf16", torch.device("cuda", 0))
    assert str(info.value) == "train.precision: bf16 is not supported on this GPU; use fp16 or fp32"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(("name", "dtype"), [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_cuda_autocast(name: str, dtype: torch.dtype) -> None:
    precision = Precision(name, resolve_device("cuda"))
    a, b = torch.randn(4, 8, device="cuda"), torch.randn(8, 2, device="cuda")
    with precision.autocast():
        assert (a @ b).dtype == dtype
    assert (precision.scaler is not None) == (name == "fp16")
