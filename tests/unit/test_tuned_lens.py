"""The tuned lens: identity translators are the logit lens; training lowers held-out KL; save and load."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mechbiqa.analysis.lens import (
    LogitLens,
    TunedLens,
    TunedLensTraining,
    kl_to_final,
    train_tuned_lens,
)
from mechbiqa.sources import tiny_random_model


@pytest.fixture(scope="module")
def base():
    model, _, _ = tiny_random_model(0)
    return LogitLens.from_model(model)


def planted(n: int = 96, d: int = 32, seed: int = 0) -> torch.Tensor:
    """``[3, n, d]``: layer 2 is the model's residual; layers 0, 1 are it through fixed affine maps + noise.

    A tuned lens can undo the maps (the best translator of layer l is their inverse); the logit
    lens cannot.
    """
    g = torch.Generator().manual_seed(seed)
    final = torch.randn(n, d, generator=g) * 3
    rows = [
        final @ (torch.eye(d) + 0.8 * torch.randn(d, d, generator=g) / d**0.5)
        + torch.randn(d, generator=g)
        + 0.05 * torch.randn(n, d, generator=g)
        for _ in range(2)
    ]
    return torch.stack([*rows, final])


def test_identity_translators_are_the_logit_lens(base):
    resid = planted()
    tuned = TunedLens(base, [0, 1, 2])
    for layer in range(3):
        torch.testing.assert_close(tuned(resid[layer], layer), base(resid[layer], layer), rtol=0, atol=1e-6)
    np.testing.assert_allclose(kl_to_final(tuned, resid, [0, 1, 2]), kl_to_final(base, resid, [0, 1, 2]))
    assert kl_to_final(base, resid, [0, 1, 2])[-1] == pytest.approx(0.0, abs=1e-9)


def test_training_lowers_held_out_kl_and_keeps_the_last_layer(base, tmp_path):
    resid = planted()
    fit = train_tuned_lens(base, resid, [0, 1, 2], TunedLensTraining(steps=60, lr=5e-2, holdout=0.25))
    held = resid[:, torch.from_numpy(fit.heldout)]
    before, after = kl_to_final(base, held, [0, 1, 2]), kl_to_final(fit.lens, held, [0, 1, 2])
    assert len(fit.heldout) == 24 and not set(fit.heldout) & set(fit.train)
    assert (after[:2] < 0.3 * before[:2]).all(), (before, after)  # measured 0.099 -> 0.014, 0.096 -> 0.004
    assert fit.loss[-1] < fit.loss[0]
    torch.testing.assert_close(fit.lens.translators["2"].weight, torch.eye(32))  # the last layer: identity
    # saved and read back: the same logits
    fit.lens.save(tmp_path / "lens", store="planted")
    again = TunedLens.load(tmp_path / "lens", base)
    torch.testing.assert_close(again(resid[0], 0), fit.lens(resid[0], 0))
    with pytest.raises(FileNotFoundError, match="tuned_lens.py"):
        TunedLens.load(tmp_path, base)
    with pytest.raises(KeyError, match="no translator for layer 5"):
        fit.lens(resid[0], 5)


def test_given_held_out_samples_are_not_trained_on(base):
    """Cross-fitting: the named samples are held out; moving them does not change the fit on the others."""
    resid = planted(n=16)
    config = TunedLensTraining(steps=10, lr=5e-2, batch_size=None)
    fit = train_tuned_lens(base, resid, [0, 1, 2], config, heldout=[3, 0, 7])
    assert fit.heldout.tolist() == [0, 3, 7] and fit.train.tolist() == [i for i in range(16) if i not in (0, 3, 7)]
    # the held-out rows may be anything: the translators depend on the training rows alone
    changed = resid.clone()
    changed[:, [0, 3, 7]] = 100.0
    other = train_tuned_lens(base, changed, [0, 1, 2], config, heldout=[0, 3, 7])
    torch.testing.assert_close(other.lens.translators["0"].weight, fit.lens.translators["0"].weight)
    for bad in ([], list(range(16)), [16]):
        with pytest.raises(ValueError, match="heldout must name"):
            train_tuned_lens(base, resid, [0, 1, 2], config, heldout=bad)


def test_a_tuned_lens_is_refused_on_another_models_read_out(base, tmp_path):
    """Same widths, other weights: loading the translators onto them would read the layers wrongly."""
    lens = TunedLens(base, [0, 1, 2])
    lens.save(tmp_path / "lens", model="tiny-random(seed=0)")
    other_model, _, _ = tiny_random_model(1)
    other = LogitLens.from_model(other_model, source="tiny-random(seed=1)")
    assert other.unembed.weight.shape == base.unembed.weight.shape
    with pytest.raises(ValueError, match=r"trained for another model \(tiny-random\(seed=0\).*seed=1"):
        TunedLens.load(tmp_path / "lens", other)
    # its read-out is its base's: a store check (`check_lens`) sees the model it reads out through
    assert TunedLens.load(tmp_path / "lens", base).readout_fingerprint(torch.float32) == (
        base.readout_fingerprint(torch.float32)
    )
