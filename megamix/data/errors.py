"""The data package's error type."""

from __future__ import annotations

from megamix.errors import MegamixError


class DataError(MegamixError, ValueError):
    """Training data that cannot be used as configured: a token id beyond the model's vocabulary,
    a corpus written by another tokenizer, a split or blend that cannot supply the samples asked.
    The message names the corpus (and the sample, when one is at fault)."""
