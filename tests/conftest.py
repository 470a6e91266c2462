from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

# Never reach for the hub in tests: everything is built or shipped locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _tokenization_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test's tokenization cache is a fresh temporary folder, never the user's ~/.cache."""
    root = tmp_path_factory.mktemp("aligntk-cache")
    monkeypatch.setenv("ALIGNTK_CACHE", str(root))
    return root


@pytest.fixture
def tiny(tmp_path: Path) -> dict[str, Any]:
    """A tiny SFT recipe (dict) with its tokenizer and addition data in tmp_path."""
    from aligntk.testing import write_tiny_assets

    return write_tiny_assets(tmp_path / "assets")
