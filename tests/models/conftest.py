"""Fixtures of the method-specific model tests; each module defines its own `model`."""

import pytest

from tests.dynamic_helpers import precision_pairs, sample_images


@pytest.fixture(scope="module")
def pairs(model):
    """float32 and float64 (model, compact executor) pairs of the module's model."""
    return precision_pairs(model)


@pytest.fixture(scope="module")
def images():
    return sample_images()
