"""Conditioning dropout: rates (statistical, fixed seed), exclusivity, determinism."""

import numpy as np
import pytest

from ipadapter_jax.data.conditioning_dropout import (
    DropoutRates,
    drop_captions,
    sample_conditioning_drops,
    zero_dropped_images,
)

N = 200_000
# Binomial std for p=0.05, n=200k is ~0.0005; 0.003 is ~6 sigma.
RATE_TOLERANCE = 0.003


def _outcome_rates(drop_text, drop_image):
    return {
        "text_only": float(np.mean(drop_text & ~drop_image)),
        "image_only": float(np.mean(drop_image & ~drop_text)),
        "both": float(np.mean(drop_text & drop_image)),
        "none": float(np.mean(~drop_text & ~drop_image)),
    }


@pytest.mark.parametrize("rates", [DropoutRates(), DropoutRates(text=0.1, image=0.02, both=0.3)])
def test_rates_match_configuration(rates):
    drop_text, drop_image = sample_conditioning_drops(N, rates, seed=0, step=0)
    assert drop_text.dtype == bool and drop_text.shape == (N,) and drop_image.shape == (N,)
    got = _outcome_rates(drop_text, drop_image)
    expected = {
        "text_only": rates.text,
        "image_only": rates.image,
        "both": rates.both,
        "none": 1 - rates.text - rates.image - rates.both,
    }
    for name in expected:
        assert abs(got[name] - expected[name]) < RATE_TOLERANCE, (name, got, expected)


def test_rates_hold_over_many_small_batches():
    drops = [sample_conditioning_drops(16, DropoutRates(), seed=3, step=s) for s in range(10_000)]
    got = _outcome_rates(np.concatenate([d[0] for d in drops]), np.concatenate([d[1] for d in drops]))
    for name in ("text_only", "image_only", "both"):
        assert abs(got[name] - 0.05) < RATE_TOLERANCE, got


def test_deterministic_per_seed_step_and_process():
    a = sample_conditioning_drops(4096, DropoutRates(), seed=1, step=7, process_index=2)
    b = sample_conditioning_drops(4096, DropoutRates(), seed=1, step=7, process_index=2)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    for other in [dict(seed=2, step=7, process_index=2), dict(seed=1, step=8, process_index=2),
                  dict(seed=1, step=7, process_index=0)]:
        c = sample_conditioning_drops(4096, DropoutRates(), **other)
        assert not np.array_equal(a[0] | a[1], c[0] | c[1]), other


def test_zero_rates_and_invalid_rates():
    drop_text, drop_image = sample_conditioning_drops(1000, DropoutRates(0, 0, 0), seed=0, step=0)
    assert not drop_text.any() and not drop_image.any()
    with pytest.raises(ValueError):
        DropoutRates(text=0.5, image=0.4, both=0.2)
    with pytest.raises(ValueError):
        DropoutRates(text=-0.1)


def test_drop_helpers():
    ids = np.arange(12, dtype=np.int32).reshape(3, 4)
    empty = np.array([49406, 49407, 49407, 49407], np.int32)
    out = drop_captions(ids, np.array([False, True, False]), empty)
    np.testing.assert_array_equal(out[1], empty)
    np.testing.assert_array_equal(out[[0, 2]], ids[[0, 2]])
    assert ids[1, 0] == 4  # input untouched
    pixels = np.ones((3, 2, 2, 3), np.float32)
    zeroed = zero_dropped_images(pixels, np.array([True, False, False]))
    assert (zeroed[0] == 0).all() and (zeroed[1:] == 1).all() and (pixels == 1).all()
