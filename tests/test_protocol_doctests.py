"""Run the docstring examples of every jacana.protocol module."""

import doctest
import importlib

import pytest

MODULES = [f"jacana.protocol.{m}" for m in ("errors", "message", "provenance", "stage", "rpc", "transport", "pipeline",
                                             "server")] + ["jacana.bench.message"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {module.__name__}"
