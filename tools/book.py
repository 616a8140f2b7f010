"""Helpers shared by the test harness: list the chapters, execute them, render the quick HTML build."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
QUICK = ROOT / "_build" / "quick"
EXECUTED = QUICK / "executed"  # papermill outputs, mirroring the source tree
QUICK_BOOK = QUICK / "book"  # a copy of the book whose notebooks are the executed ones


def toc_files(toc: Path = ROOT / "_toc.yml") -> list[str]:
    """Every file named in the table of contents (without suffix), root first."""
    data = yaml.safe_load(toc.read_text())
    files = [data["root"]]

    def walk(entries):
        for e in entries or []:
            if "file" in e:
                files.append(e["file"])
            walk(e.get("sections"))
            walk(e.get("chapters"))

    for part in data.get("parts", []):
        walk(part.get("chapters"))
    walk(data.get("chapters"))
    return files


def chapters() -> list[Path]:
    """The notebooks of the book, in table-of-contents order (paths relative to the root)."""
    out = []
    for f in toc_files():
        p = ROOT / f"{f}.ipynb"
        if p.is_file():
            out.append(p.relative_to(ROOT))
    return out


def execute(chapter: Path, profile: str = "quick") -> Path:
    """Execute ``chapter`` with papermill and ``PROFILE=profile`` into ``_build/quick/executed``.

    Raises papermill's ``PapermillExecutionError`` (which names the failing cell) on failure.
    """
    import papermill

    out = EXECUTED / chapter
    out.parent.mkdir(parents=True, exist_ok=True)
    papermill.execute_notebook(
        str(ROOT / chapter), str(out), parameters={"PROFILE": profile}, kernel_name="python3",
        cwd=str((ROOT / chapter).parent), progress_bar=False, log_output=False,
    )  # fmt: skip
    return out


def failing_cell(notebook: Path) -> str:
    """A one-paragraph description of the first cell of an executed notebook that raised."""
    nb = json.loads(notebook.read_text())
    code_index = 0
    for cell in nb["cells"]:
        if cell["cell_type"] != "code":
            continue
        code_index += 1
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                src = "".join(cell["source"]).strip().splitlines()
                head = "\n    ".join(src[:6])
                return (f"code cell {code_index} raised {out['ename']}: {out['evalue']}\n"
                        f"    {head}")  # fmt: skip
    return "no cell recorded an error"


def prepare_quick_book() -> Path:
    """Copy the book's sources to ``_build/quick/book`` with the executed notebooks and execution off."""
    if QUICK_BOOK.exists():
        shutil.rmtree(QUICK_BOOK)
    QUICK_BOOK.mkdir(parents=True)
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    config["execute"]["execute_notebooks"] = "off"
    (QUICK_BOOK / "_config.yml").write_text(yaml.safe_dump(config, sort_keys=False))
    for name in ("_toc.yml", "references.bib", "tools/sphinx_dedup_scripts.py", "_static/favicon.svg"):
        (QUICK_BOOK / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, QUICK_BOOK / name)
    for f in toc_files():
        for suffix in (".md", ".ipynb"):
            src = ROOT / f"{f}{suffix}"
            if not src.is_file():
                continue
            if suffix == ".ipynb":
                src = EXECUTED / f"{f}{suffix}"
                if not src.is_file():
                    raise FileNotFoundError(f"{src} is missing: run `make notebooks` first")
            dst = QUICK_BOOK / f"{f}{suffix}"
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, dst)
    return QUICK_BOOK
