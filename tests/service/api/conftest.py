"""Fixtures the API tests share: `loaded`, the default model (the embedded SmolLM2 GGUF), once per test module
(module scope: the decoders a module builds from it share its tensors, so no module sees another's)."""
import pytest

from service.model import load_model


@pytest.fixture(scope="module")
def loaded():
    return load_model(None)
