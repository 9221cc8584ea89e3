"""Latent-space de-biasing: the complement's closed form, a tiny end-to-end run, the generator stage's cache."""
import io
import pytest
import torch

from trainer import TrainConfig, fit
from trainer.methods.latent_aug import complement


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_complement_keeps_the_target_score_and_negates_the_attribute_score(seed):
    g = torch.Generator().manual_seed(seed)
    d = 12
    w_t, w_a = torch.randn(d, generator=g, dtype=torch.float64) * 3, torch.randn(d, generator=g, dtype=torch.float64)
    b_t, b_a = 0.7, -1.3
    z = torch.randn(50, d, generator=g, dtype=torch.float64)
    z2 = complement(z, w_t, b_t, w_a, b_a)
    torch.testing.assert_close(z2 @ w_t + b_t, z @ w_t + b_t, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(z2 @ w_a + b_a, -(z @ w_a + b_a), rtol=1e-12, atol=1e-12)
    assert (z2 - z).abs().max() > 0.1  # it moved: not the identity


def test_a_tiny_run_trains_on_real_and_synthetic_and_a_second_trial_reuses_the_generator(tmp_path, monkeypatch):
    monkeypatch.setenv("DEBIAS_CACHE_DIR", str(tmp_path))
    params = {"n_pairs": 64, "gen_epochs": 3, "width": 8, "latent_dim": 4}
    runs = [fit(TrainConfig(dataset="synthetic", method="latent_aug", epochs=2, seed=seed, method_params=params),
                log=None) for seed in (0, 1)]  # two trials of one study: different training seeds
    first, second = (r.history[0] for r in runs)
    assert first["generator_cached"] is False and second["generator_cached"] is True
    assert second["generator_seconds"] < first["generator_seconds"]
    assert len(list((tmp_path / "latent_aug").glob("*.pt"))) == 1  # one stage, shared
    assert runs[0].history[1].get("generator_seconds") is None  # logged once, in the epoch that built it
    for r in runs:
        assert r.uses_group_labels and 0.0 <= r.test["wga"] <= 1.0
    data = next((tmp_path / "latent_aug").glob("*.pt")).read_bytes()  # a verified cache file: a header line first
    stage = torch.load(io.BytesIO(data[data.index(b"\n") + 1:]), weights_only=True)
    assert stage["x"].shape[0] == 128 and stage["y"].tolist()[:64] == stage["y"].tolist()[64:]  # pairs share labels
    torch.testing.assert_close(stage["a_score"][64:], -stage["a_score"][:64], rtol=1e-4, atol=1e-4)
    p = fit(TrainConfig(dataset="synthetic", method="latent_aug", epochs=2, seed=0,
                        method_params={**params, "width": 9}), log=None)
    assert p.history[0]["generator_cached"] is False  # other settings: another stage
