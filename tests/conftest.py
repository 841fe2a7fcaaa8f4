"""Shared test fixtures: paths to ../shared/fixtures and tiny random models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mechbiqa.model import ModelConfig, MPLUGOwl2

REPO = Path(__file__).resolve().parents[1]
SHARED_FIXTURES = REPO.parent / "shared" / "fixtures"
TINY_FIXTURE = SHARED_FIXTURES / "mplug_owl2_tiny"
LLAMA_TOKENIZER = SHARED_FIXTURES / "llama2_tokenizer.model"


def require(path: Path) -> Path:
    """Skip (with the reason) when a shared fixture is absent."""
    if not path.exists():
        pytest.skip(f"{path} is not present (it lives in ../shared/fixtures beside the repository)")
    return path


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter a distinct random value (norms near 1), so mixed-up branches show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=g)
            if p.ndim == 1 and ("ln" in name or "norm" in name):
                p.copy_(1 + 0.3 * noise if name.endswith("weight") else 0.1 * noise)
            elif p.ndim >= 2 and "embed" not in name and "cls" not in name and "eos" not in name:
                p.copy_(noise / p.shape[-1] ** 0.5 if p.ndim == 2 else noise / p[0].numel() ** 0.5)
            else:
                p.copy_(0.5 * noise if p.ndim >= 2 or "eos" in name else 0.1 * noise)
    return model


@pytest.fixture
def tiny_model() -> MPLUGOwl2:
    """A random ModelConfig.tiny() model in eval mode."""
    torch.manual_seed(0)
    return randomize_(MPLUGOwl2(ModelConfig.tiny())).eval()
