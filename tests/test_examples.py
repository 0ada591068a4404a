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


def test_readme_usage(capsys):
    """The README's usage example runs and prints one line per parameter.

    Args:
        capsys: Pytest's capture of stdout and stderr.
    """
    readme = (EXAMPLES_DIR.parent.parent / "README.md").read_text()
    code = readme.split("```python\n", 1)[1].split("```", 1)[0]
    exec(compile(code, "README.md", "exec"), {"__name__": "__main__"})
    assert len(capsys.readouterr().out.strip().splitlines()) == 4
