"""Run every script in ``docs/examples`` as ``python docs/examples/<name>.py`` would."""

import runpy
from pathlib import Path

from pytest import mark

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "docs" / "examples"
EXAMPLES = sorted(EXAMPLES_DIR.glob("*.py"))
EXAMPLE_IDS = [path.stem for path in EXAMPLES]


def test_examples_exist():
    """The glob finds the examples (guards against a moved directory)."""
    assert EXAMPLES, f"No examples found in {EXAMPLES_DIR}."


@mark.parametrize("path", EXAMPLES, ids=EXAMPLE_IDS)
def test_example(path: Path, capsys):
    """Run one example script as ``__main__``; it must finish and print something.

    Args:
        path: Path of the example script.
        capsys: Pytest's capture of stdout and stderr.
    """
    runpy.run_path(str(path), run_name="__main__")
    assert capsys.readouterr().out.strip(), f"{path.name} printed nothing."
