"""Each adapter names every norm of its family (DWQ trains them): exactly the modules whose
class is a norm, the rule DWQ used before the adapters said it."""

from __future__ import annotations

import pytest

from secateur.models import adapter_for
from tests.tiny_models import configs, tiny_model


def _norms_by_class(model) -> set[int]:
    return {id(m) for m in model.modules() if "norm" in type(m).__name__.lower()}


@pytest.mark.parametrize("family", sorted(configs()))
def test_adapter_norms_are_every_norm_of_the_model(family):
    model = tiny_model(family)
    found = adapter_for(model).norm_modules()
    assert len(found) == len({id(m) for m in found})
    assert {id(m) for m in found} == _norms_by_class(model)
