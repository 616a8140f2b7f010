"""The repository's own rules: notebooks are committed stripped, open with a parameters cell, and are
all in the table of contents; norms in markdown tables are written ``\\lVert x \\rVert``, never ``\\|``;
the set-up's torch/torchvision pair works."""

import json
import subprocess
import sys

import pytest
from book import ROOT, chapters, toc_files
from launch import is_colab_cell

NOTEBOOKS = sorted(p.relative_to(ROOT) for p in (ROOT / "chapters").rglob("*.ipynb")
                   if ".ipynb_checkpoints" not in p.parts)  # fmt: skip
MARKDOWN = sorted(p.relative_to(ROOT) for p in (ROOT / "chapters").rglob("*.md")
                  if ".ipynb_checkpoints" not in p.parts)  # fmt: skip


def test_every_notebook_is_in_the_toc():
    listed = {str(c) for c in chapters()}
    assert listed == {str(p) for p in NOTEBOOKS}


def test_every_toc_entry_exists():
    for f in toc_files():
        assert any((ROOT / f"{f}{s}").is_file() for s in (".md", ".ipynb")), f"{f} is in _toc.yml but missing"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=str)
def test_notebook_is_stripped(path):
    nb = json.loads((ROOT / path).read_text())
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] == "code":
            assert not cell.get("outputs"), f"{path} cell {i} has committed outputs"
            assert cell.get("execution_count") is None, f"{path} cell {i} has an execution count"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=str)
def test_notebook_opens_with_parameters_cell(path):
    nb = json.loads((ROOT / path).read_text())
    assert nb["cells"][0]["cell_type"] == "markdown" and nb["cells"][0]["source"][0].startswith("# ")
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    first = code[0]
    tags = first["metadata"].get("tags", [])
    assert "parameters" in tags, f"{path}: first code cell is not tagged parameters"
    src = "".join(first["source"])
    assert 'PROFILE = "book"' in src and "SIZES" in src, f"{path}: parameters cell must set PROFILE and SIZES"
    assert sum("parameters" in c["metadata"].get("tags", []) for c in code) == 1
    # the Colab install cell (tools/launch.py, tested in test_launch.py) may stand between the two
    setup = next(c for c in code[1:] if not is_colab_cell(c))
    assert "sl.setup(PROFILE, SIZES" in "".join(setup["source"]), (
        f"{path}: the cell after the parameters cell (and the Colab install cell) must call sl.setup"
    )
    assert nb["metadata"]["kernelspec"]["name"] == "python3"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=str)
def test_chapter_has_learning_goals_summary_and_exercises(path):
    text = "\n".join("".join(c["source"]) for c in json.loads((ROOT / path).read_text())["cells"]
                     if c["cell_type"] == "markdown")  # fmt: skip
    assert "What you will learn" in text
    assert "## Summary" in text and "## Exercises" in text


def markdown_sources(path):
    """The markdown of a chapter source: every markdown cell of a notebook, or a whole .md file."""
    if path.suffix == ".md":
        return [(ROOT / path).read_text()]
    cells = json.loads((ROOT / path).read_text())["cells"]
    return ["".join(c["source"]) for c in cells if c["cell_type"] == "markdown"]


def escaped_pipe_rows(text):
    """The markdown table rows of ``text`` that contain ``\\|``."""
    return [line for line in text.splitlines() if line.lstrip().startswith("|") and "\\|" in line]


@pytest.mark.parametrize("path", NOTEBOOKS + MARKDOWN, ids=str)
def test_no_escaped_pipe_in_table_rows(path):
    """Inside a markdown table row ``\\|`` is the table's escaped pipe, so ``$\\|x\\|$`` reaches MathJax
    as ``|x|`` (an absolute value): norms in tables must be written ``\\lVert x \\rVert``."""
    bad = [row for text in markdown_sources(path) for row in escaped_pipe_rows(text)]
    assert not bad, f"{path}: table rows with \\| (renders as |); use \\lVert ... \\rVert:\n" + "\n".join(bad)


#: The rendered column shows about 75 characters of code in a 1280-pixel window.
CODE_COLUMNS = 75


@pytest.mark.parametrize("path", NOTEBOOKS, ids=str)
def test_chapter_code_fits_the_column(path):
    """Code lines longer than the rendered column end off-screen: keep them within it (the Colab
    install cell, which the book removes from the page, excepted)."""
    nb = json.loads((ROOT / path).read_text())
    long = [
        line
        for cell in nb["cells"]
        if cell["cell_type"] == "code" and not is_colab_cell(cell)
        for line in "".join(cell["source"]).splitlines()
        if len(line) > CODE_COLUMNS
    ]
    assert not long, f"{path}: code lines over {CODE_COLUMNS} characters:\n" + "\n".join(long)


def test_escaped_pipe_rows_finds_norms_in_tables_only():
    text = "| E0 | $\\|J(x)\\|$ |\n| E1 | $\\lVert x\\rVert$ |\nprose $\\|x\\|$ is fine\n"
    assert escaped_pipe_rows(text) == ["| E0 | $\\|J(x)\\|$ |"]


def test_torchvision_compiled_ops_work():
    cmd = [sys.executable, str(ROOT / "tools" / "check_env.py")]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
