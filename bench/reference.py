"""Brute-force references the benchmarks compare against (the tests keep their own, tests/helpers.py).

Written from the definitions: the L1-normalised word histogram of a bag, and the chi-squared distance
between two such histograms (the paper, section 3.2), sum over words in either of (x_w - y_w)^2 /
(x_w + y_w), in [0, 2].
"""

from __future__ import annotations

import numpy as np

from common.bow_codec import BagOfWords


def dense(bag: BagOfWords) -> np.ndarray:
    """(V,) float32 L1-normalised word histogram of the bag."""
    out = np.zeros(bag.vocabulary, np.float32)
    out[bag.words] = bag.histogram()
    return out


def chi2_distances(queries: np.ndarray, items: np.ndarray) -> np.ndarray:
    """(Q, V), (M, V) float32 L1-normalised histograms -> (Q, M) float32 chi-squared distances; a word
    absent from both adds 0."""
    out = np.empty((len(queries), len(items)), np.float32)
    for i, query in enumerate(queries):
        total = query[None, :] + items
        diff = query[None, :] - items
        with np.errstate(invalid="ignore", divide="ignore"):
            terms = np.where(total > 0, diff * diff / total, 0)
        out[i] = terms.sum(axis=1)
    return out
