"""Runs every docstring example in ``tekfax`` with the shared setup of docs/examples.md."""

import doctest
import importlib
import inspect
import pathlib
import pkgutil
import re

import pytest

import tekfax

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODULES = sorted(
    info.name
    for info in pkgutil.walk_packages(tekfax.__path__, prefix="tekfax.")
    if not info.name.endswith("__main__")
)


def _preamble() -> str:
    """The first python code block of docs/examples.md."""
    text = (ROOT / "docs" / "examples.md").read_text()
    return re.search(r"```python\n(.*?)```", text, re.S).group(1)


@pytest.fixture(scope="module")
def namespace() -> dict:
    globs: dict = {"__name__": "tekfax_examples"}
    exec(compile(_preamble(), "docs/examples.md", "exec"), globs)
    return globs


@pytest.mark.parametrize("name", MODULES)
def test_examples_run(name, namespace):
    module = importlib.import_module(name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in finder.find(module, name, globs=namespace):
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name}"


def test_no_skipped_examples():
    skipped = [
        str(path.relative_to(ROOT))
        for path in (ROOT / "tekfax").rglob("*.py")
        if "+SKIP" in path.read_text()
    ]
    assert not skipped, f"docstring examples marked +SKIP: {skipped}"


def test_public_names_have_examples(namespace):
    """Every public optimizer and function documents a runnable example."""
    missing = [
        name
        for name in tekfax.__all__
        if callable(getattr(tekfax, name))
        and not isinstance(getattr(tekfax, name), type)
        and ">>>" not in (getattr(tekfax, name).__doc__ or "")
    ]
    assert not missing, f"public functions without a docstring example: {missing}"


@pytest.mark.parametrize("module", [tekfax.diagnostics, tekfax.sharding])
def test_module_functions_have_examples(module):
    """Every public function defined in the diagnostics and sharding modules has an example."""
    missing = [
        name
        for name, obj in vars(module).items()
        if inspect.isfunction(obj)
        and obj.__module__ == module.__name__
        and not name.startswith("_")
        and ">>>" not in (obj.__doc__ or "")
    ]
    assert not missing, f"{module.__name__}: public functions without an example: {missing}"
