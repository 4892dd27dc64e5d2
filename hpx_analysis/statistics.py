"""Statistics the analyzers share: bootstrap confidence intervals of means (scipy's ``bootstrap``)."""

from __future__ import annotations

import warnings

import numpy as np


def bootstrap_ci(flags: np.ndarray, n_resamples: int, seed: int) -> np.ndarray:
    """95% percentile bootstrap interval of the mean of each row of ``flags`` (K, N): (K, 2); the mean twice for
    fewer than two values (NaN for none)."""
    from scipy.stats import DegenerateDataWarning, bootstrap
    if flags.shape[1] < 2:
        mean = flags.mean(axis=1) if flags.shape[1] else np.full(len(flags), np.nan)
        return np.stack([mean, mean], axis=1)
    batch = max(1, int(2e7 // flags.size))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DegenerateDataWarning)
        ci = bootstrap((flags.astype(np.float64),), np.mean, axis=-1, n_resamples=n_resamples, batch=batch,
                       vectorized=True, method="percentile", rng=np.random.default_rng(seed)).confidence_interval
    return np.stack([ci.low, ci.high], axis=1)


__all__ = ["bootstrap_ci"]
