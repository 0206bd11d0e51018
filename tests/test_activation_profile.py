"""experiments/activation_profile.py: how far Wanda's input-norm weighting moves its mask away from magnitude's."""
import pytest
import torch

from experiment_scripts import load_experiment

profile = load_experiment("activation_profile")


def test_equal_input_norms_make_wanda_prune_what_magnitude_prunes():
    weight = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    row = profile.layer_row("w", weight, torch.full((16,), 4.0), 0.5)
    assert row["agreement"] == 1.0 and row["max_over_median"] == pytest.approx(1.0)
    assert row["top_share"] == pytest.approx(1 / 16)


def test_one_loud_channel_is_kept_by_wanda_and_moves_the_mask():
    weight = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    weight[:, 3] = 1e-3  # magnitude prunes column 3 in every row
    sq = torch.ones(16)
    sq[3] = 1e12  # Wanda keeps it in every row
    row = profile.layer_row("w", weight, sq, 0.5)
    _, keep = profile.wanda(weight, 0.5, {"sq_norms": sq})
    assert keep[:, 3].all()
    assert row["agreement"] == pytest.approx(1 - 8 / 64)  # one of magnitude's 8 pruned weights per row differs
    assert row["max_over_median"] == pytest.approx(1e6) and row["top_share"] > 0.99
    assert "| w | 1000000.0 |" in profile.table([row], 0.5)


def test_bad_arguments_are_refused():
    with pytest.raises(SystemExit, match="--ratio is 1.5; expected a sparsity in"):
        profile.main(["--ratio", "1.5"])
    with pytest.raises(SystemExit, match="--n-calib is 0"):
        profile.main(["--n-calib", "0"])
