"""The 10-minute soak (bench/soak.py), only with --run-slow."""
import pytest


@pytest.mark.slow
def test_soak_ten_minutes(default_model_dir, tmp_path):
    from bench import soak

    assert soak.main(["--minutes", "10", "--clients", "8", "--out", str(tmp_path)]) == 0
