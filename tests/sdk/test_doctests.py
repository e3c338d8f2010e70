"""The examples in the core's docstrings run."""

import doctest
import importlib

import pytest

MODULES = ["adapterspec.targets", "adapterspec.config", "adapterspec.naming", "adapterspec.checks",
           "adapterspec.spec", "adapterspec.options", "adapterspec.adapter", "adapterspec.errors",
           "adapterspec._jsonpos", "adapterspec._regex", "adapterspec._rules", "adapterspec._oft", "adapterspec._vera",
           "adapterspec._adalora", "adapterspec._moe", "adapterspec._mix",
           "adapterspec._tying", "adapterspec._lfs", "adapterspec._dispatch",
           "adapterspec.conformance.locations", "adapterspec._foreign"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    # exception messages are compared too (with ELLIPSIS): an example shows the message the call raises
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
