"""Sampling arguments: seeds of any size keep every bit; steps < 1 and non-finite guidance are
refused before any sampling (they used to run the default 8 steps, or give a black image)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from pqjax.pipelines.pipeline import check_sampling, seed_key


def _bits(key) -> np.ndarray:
    return np.asarray(jax.random.key_data(key))


@pytest.mark.parametrize("seed", [0, 5, 2**32 - 1])
def test_seeds_below_2_32_are_jax_keys(seed):
    np.testing.assert_array_equal(_bits(seed_key(seed)), _bits(jax.random.key(seed)))


def test_high_bits_give_other_keys():
    seeds = [0, 1, 2**32, 2**32 + 1, 2**64, 2**64 + 2**32, 2**70, 2**70 + 1]
    keys = {tuple(_bits(seed_key(s)).tolist()) for s in seeds}
    assert len(keys) == len(seeds)
    # the same seed always gives the same key
    np.testing.assert_array_equal(_bits(seed_key(2**70)), _bits(seed_key(2**70)))


@pytest.mark.parametrize("seed", [-1, 1.0, "3", True])
def test_bad_seeds_are_refused(seed):
    with pytest.raises(ValueError, match="seed must be a non-negative integer"):
        seed_key(seed)


@pytest.mark.parametrize(
    "steps,guidance,match",
    [
        (0, 3.5, "num_steps must be an integer >= 1, got 0"),
        (-2, 3.5, "num_steps"),
        (2.5, 3.5, "num_steps"),
        (4, float("nan"), "guidance must be a finite number >= 0, got nan"),
        (4, float("inf"), "guidance"),
        (4, -1.0, "guidance"),
        (4, "high", "guidance"),
    ],
)
def test_bad_sampling_arguments_are_refused(steps, guidance, match):
    with pytest.raises(ValueError, match=match):
        check_sampling(steps, guidance)


def test_generate_refuses_before_sampling():
    from pqjax.pipelines.load import EMBEDDED, load_pipeline

    pipe = load_pipeline(EMBEDDED)
    with pytest.raises(ValueError, match="num_steps"):
        pipe.generate(["a handwritten digit 7"], num_steps=0)
    with pytest.raises(ValueError, match="guidance"):
        pipe.generate(["a handwritten digit 7"], guidance=float("nan"))
    check_sampling(1, 0.0)  # the smallest valid values pass
