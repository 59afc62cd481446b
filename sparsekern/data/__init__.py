"""Small data sets shipped with sparsekern (see DIGITS_LICENSE.txt for the digits' source and licence)."""

from __future__ import annotations

import gzip
from importlib import resources

import numpy as np


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """The UCI handwritten digits: (images float32 (1797, 64) with pixels in 0..16, labels int64 (1797,)).

    Read from the package's copy of ``digits.csv.gz`` (the file scikit-learn bundles; CC BY 4.0, UCI ML
    repository), so no download and no scikit-learn are needed.

    Example::

        >>> images, labels = sparsekern.data.load_digits()
        >>> images.shape, labels[:5].tolist()
        ((1797, 64), [0, 1, 2, 3, 4])
    """
    with resources.files(__name__).joinpath("digits.csv.gz").open("rb") as raw, gzip.open(raw, "rt") as text:
        table = np.loadtxt(text, delimiter=",", dtype=np.float32)
    return table[:, :-1], table[:, -1].astype(np.int64)
