"""Where the book lives, and the files that follow from it.

The ``repository:`` block of ``_config.yml`` (``url``, ``branch``, ``path_to_book``) is the one place that
says where the book lives. Jupyter Book's repository button and its Binder and Colab launch buttons read
it directly. This tool writes the two things that follow from it and from the lock:

- the Colab install cell: a code cell, right after the parameters cell of every chapter, that installs
  ``sensitivity_lib[book]`` from that repository when the notebook runs in Colab without the library, and
  does nothing anywhere else;
- ``binder/requirements.txt``: ``requirements.txt`` with torch and torchvision's CPU builds and without
  the CUDA packages (Binder has no GPU; the image is gigabytes smaller).

Usage (``make launch`` and ``make repository URL=...`` call it)::

    python tools/launch.py --check          exit 1 and name every file that --write would change
    python tools/launch.py --write          write them; only what differs changes, so a rerun does nothing
    python tools/launch.py --set-url URL [--branch BRANCH]
                                            change the repository block of _config.yml, then --write
    python tools/launch.py --print url|branch|requirement
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml
from book import toc_files

ROOT = Path(__file__).resolve().parents[1]
CELL_ID = "colab-install"  # how the tool finds the cell it wrote (nbformat 4.5 cell ids)
CELL_TAGS = ["remove-cell"]  # the rendered book does not show it
GITHUB_URL = re.compile(r"https://github\.com/[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+")
BINDER_REQUIREMENTS = Path("binder") / "requirements.txt"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


class LaunchError(Exception):
    """A configuration this tool cannot work from; the message says what to fix."""


@dataclass(frozen=True)
class Repository:
    url: str
    branch: str
    path_to_book: str = ""

    @property
    def requirement(self) -> str:
        """What pip installs in Colab: the library and the packages the chapters import."""
        sub = self.path_to_book.strip("/")
        return f"sensitivity_lib[book] @ git+{self.url}@{self.branch}" + (
            f"#subdirectory={sub}" if sub and sub != "." else ""
        )


def check_url(url: str) -> str:
    """``url`` if it is a GitHub repository's address; otherwise a LaunchError that says what is wrong."""
    if not isinstance(url, str) or not GITHUB_URL.fullmatch(url) or url.endswith(".git"):
        raise LaunchError(
            f"repository.url must be a GitHub repository's address, https://github.com/OWNER/NAME (no "
            f"trailing slash, no .git): Binder's and Colab's launch buttons only open GitHub; got {url!r}"
        )
    return url


def check_branch(branch: str) -> str:
    if not isinstance(branch, str) or not re.fullmatch(r"[A-Za-z0-9._/-]+", branch) or ".." in branch:
        raise LaunchError(f"repository.branch must be a git branch name, got {branch!r}")
    return branch


def repository(root: Path = ROOT) -> Repository:
    """The ``repository:`` block of ``root/_config.yml``, checked."""
    config = yaml.safe_load((root / "_config.yml").read_text())
    block = config.get("repository") if isinstance(config, dict) else None
    if not isinstance(block, dict):
        raise LaunchError(f"{root / '_config.yml'} has no `repository:` block (url, branch, path_to_book)")
    return Repository(
        check_url(block.get("url")), check_branch(block.get("branch")), str(block.get("path_to_book") or "")
    )


# ---------------------------------------------------------------------------------------------------
# The Colab install cell

CELL_TEMPLATE = '''\
# Colab only: install sensitivity_lib and the packages the chapters use, from the book's repository.
# Anywhere else, or once the library is installed, this cell does nothing. Written by tools/launch.py
# from the `repository:` block of _config.yml: change that (`make repository URL=...`), not this cell.
def _install_on_colab(requirement):
    import importlib
    import importlib.metadata
    import importlib.util
    import os
    import subprocess
    import sys

    if "google.colab" not in sys.modules and "COLAB_RELEASE_TAG" not in os.environ:
        return  # not Colab
    if importlib.util.find_spec("sensitivity_lib") is not None:
        return  # installed already

    def version(dist):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    owners = importlib.metadata.packages_distributions()
    loaded = {d for m in list(sys.modules) for d in owners.get(m.partition(".")[0], ())}
    before = {d: version(d) for d in loaded}
    print(f"installing {requirement} (a minute or two, once per session)")
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", requirement],
                         capture_output=True, text=True)
    if pip.returncode != 0:
        raise RuntimeError(f"pip could not install {requirement}:\\n{pip.stdout}{pip.stderr}")
    importlib.invalidate_caches()
    changed = sorted(d for d, v in before.items() if version(d) != v)
    if changed:
        raise RuntimeError(
            f"pip changed {', '.join(changed)}, which this session had already imported: restart the "
            "session (Runtime > Restart session) and run the notebook again; this cell then does nothing"
        )
    print("installed")


_install_on_colab({requirement!r})
del _install_on_colab'''


def colab_source(repo: Repository) -> str:
    """The source of the Colab install cell for ``repo``."""
    return CELL_TEMPLATE.replace("{requirement!r}", json.dumps(repo.requirement))


def colab_cell(repo: Repository) -> dict:
    src = colab_source(repo)
    return {
        "cell_type": "code", "execution_count": None, "id": CELL_ID, "metadata": {"tags": list(CELL_TAGS)},
        "outputs": [], "source": src.splitlines(keepends=True),
    }  # fmt: skip


def _is_parameters(cell: dict) -> bool:
    return cell["cell_type"] == "code" and "parameters" in cell.get("metadata", {}).get("tags", [])


def is_colab_cell(cell: dict) -> bool:
    """The cell this tool wrote: found by its id, or by its first line if a tool renumbered the ids."""
    first = "".join(cell.get("source", [])).partition("\n")[0]
    marker = CELL_TEMPLATE.partition("\n")[0]
    return cell.get("id") == CELL_ID or (cell["cell_type"] == "code" and first == marker)


def with_colab_cell(nb: dict, repo: Repository, name: str = "notebook") -> dict:
    """``nb`` with exactly one Colab install cell, right after its parameters cell; other cells unchanged."""
    if (nb.get("nbformat", 0), nb.get("nbformat_minor", 0)) < (4, 5):
        raise LaunchError(f"{name}: needs nbformat 4.5 or later (cell ids); save it with a current Jupyter")
    cells = [c for c in nb["cells"] if not is_colab_cell(c)]
    params = [i for i, c in enumerate(cells) if _is_parameters(c)]
    if len(params) != 1:
        raise LaunchError(f"{name}: needs exactly one code cell tagged `parameters`, found {len(params)}")
    i = params[0]
    old = next((c for c in nb["cells"] if c.get("id") == CELL_ID), None)
    cell = colab_cell(repo)
    if old is not None and _same_cell(old, cell):
        cell = old  # keep it byte for byte (key order, extra metadata a tool added)
    return {**nb, "cells": cells[: i + 1] + [cell] + cells[i + 1 :]}


def _same_cell(a: dict, b: dict) -> bool:
    return (
        a["cell_type"] == b["cell_type"]
        and "".join(a.get("source", [])) == "".join(b["source"])
        and set(CELL_TAGS) <= set(a.get("metadata", {}).get("tags", []))
        and not a.get("outputs")
        and a.get("execution_count") is None
    )


def colab_cell_ok(nb: dict, repo: Repository) -> bool:
    """Whether ``nb`` has exactly one Colab install cell, right after the parameters cell, as written for
    ``repo``. Formatting (key order, indentation) is not compared."""
    found = [i for i, c in enumerate(nb["cells"]) if is_colab_cell(c)]
    if len(found) != 1 or nb["cells"][found[0]].get("id") != CELL_ID:
        return False
    i = found[0]
    return i > 0 and _is_parameters(nb["cells"][i - 1]) and _same_cell(nb["cells"][i], colab_cell(repo))


def dumps(nb: dict, like: str) -> str:
    """``nb`` as JSON in the style of the file text ``like``: nbformat's one-space indent, non-ASCII
    characters as the file had them, and its trailing newline or none."""
    ensure_ascii = not any(ord(ch) > 127 for ch in like) and "\\u" in like
    return json.dumps(nb, indent=1, ensure_ascii=ensure_ascii) + ("\n" if like.endswith("\n") else "")


def chapters(root: Path = ROOT) -> list[Path]:
    """The chapters (notebooks in the table of contents), relative to ``root``."""
    return [Path(f"{f}.ipynb") for f in toc_files(root / "_toc.yml") if (root / f"{f}.ipynb").is_file()]


# ---------------------------------------------------------------------------------------------------
# binder/requirements.txt


def is_cuda(name: str) -> bool:
    """Packages that only torch's CUDA build needs (the CPU build has none of them)."""
    return name.startswith(("nvidia-", "cuda-")) or name == "triton"


def parse_lock(text: str) -> dict[str, tuple[str, list[str]]]:
    """``uv pip compile`` output -> {name: (version, [what needs it])}, in file order."""
    out: dict[str, tuple[str, list[str]]] = {}
    current = None
    for line in text.splitlines():
        m = re.fullmatch(r"([A-Za-z0-9._-]+)==(\S+)", line.strip()) if not line.startswith(" ") else None
        if m:
            current = m.group(1).lower()
            out[current] = (m.group(2), [])
        elif current and (v := re.fullmatch(r"\s+#\s+(?:via\s+)?(\S.*)", line)) and v.group(1) != "via":
            out[current][1].append(v.group(1).strip())
    return out


def binder_requirements(lock_text: str) -> str:
    """The Binder requirements for a lock: every pin, torch/torchvision as CPU builds, no CUDA packages."""
    lock = parse_lock(lock_text)
    for name in ("torch", "torchvision"):
        if name not in lock:
            raise LaunchError(f"requirements.txt pins no {name}")
    dropped = {n for n in lock if is_cuda(n)}
    for n in sorted(dropped):
        others = set(lock[n][1]) - dropped - {"torch"}
        if others:
            raise LaunchError(
                f"requirements.txt: {n} is needed by {sorted(others)}, not only by torch's CUDA build; "
                "tools/launch.py would drop it from binder/requirements.txt"
            )
    lines = [
        "# Binder's environment: requirements.txt with torch/torchvision's CPU builds and without the CUDA",
        "# packages. Written by `make launch` (tools/launch.py) from requirements.txt: do not edit.",
        f"--extra-index-url {CPU_INDEX}",
    ]
    for name, (version, _) in lock.items():
        if name in dropped:
            continue
        if name in ("torch", "torchvision"):
            version = version.split("+")[0] + "+cpu"
        lines.append(f"{name}=={version}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------
# check / write / set-url


def planned(root: Path = ROOT) -> tuple[dict[Path, tuple[str, str | None]], dict[Path, str]]:
    """For every file that --write would change: {path: (new text, current text or None)}, {path: why}."""
    repo = repository(root)
    changes: dict[Path, tuple[str, str | None]] = {}
    reasons: dict[Path, str] = {}
    for ch in chapters(root):
        text = (root / ch).read_text(encoding="utf-8")
        nb = json.loads(text)
        if not colab_cell_ok(nb, repo):
            changes[ch] = (dumps(with_colab_cell(nb, repo, str(ch)), like=text), text)
            reasons[ch] = ("its Colab install cell is not the one written for " + repo.requirement
                           if any(is_colab_cell(c) for c in nb["cells"]) else "has no Colab install cell")
    want = binder_requirements((root / "requirements.txt").read_text())
    path = root / BINDER_REQUIREMENTS
    have = path.read_text() if path.is_file() else None
    if have != want:
        changes[BINDER_REQUIREMENTS] = (want, have)
        reasons[BINDER_REQUIREMENTS] = "missing" if have is None else "differs from what the lock gives"
    return changes, reasons


def write(root: Path = ROOT) -> list[Path]:
    changes, _ = planned(root)
    for rel, (text, _) in changes.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text, encoding="utf-8")
    return list(changes)


def set_url(url: str, branch: str | None = None, root: Path = ROOT) -> None:
    """Change ``url`` (and ``branch``) in the repository block of ``_config.yml``, keeping its comments."""
    check_url(url)
    if branch is not None:
        check_branch(branch)
    path = root / "_config.yml"
    lines = path.read_text().splitlines(keepends=True)
    try:
        start = next(i for i, line in enumerate(lines) if re.match(r"repository:\s*(#.*)?$", line))
    except StopIteration:
        raise LaunchError(f"{path} has no `repository:` block") from None
    found = set()
    for i in range(start + 1, len(lines)):
        if lines[i].strip() and not lines[i].startswith((" ", "\t", "#")):
            break  # the next top-level key
        for key, value in (("url", url), ("branch", branch)):
            m = re.match(rf"(\s+{key}:\s*)\S+(.*)$", lines[i].rstrip("\n"))
            if m and value is not None:
                lines[i] = f"{m.group(1)}{value}{m.group(2)}\n"
                found.add(key)
    if "url" not in found or (branch is not None and "branch" not in found):
        raise LaunchError(f"{path}: the repository block must have `url:` and `branch:` lines")
    path.write_text("".join(lines))
    got = repository(root)
    assert got.url == url and (branch is None or got.branch == branch), f"{path} was not rewritten as meant"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--check", action="store_true", help="exit 1 if --write would change anything")
    g.add_argument("--write", action="store_true", help="write the Colab cells and binder/requirements.txt")
    g.add_argument("--set-url", metavar="URL", help="set repository.url in _config.yml, then --write")
    g.add_argument("--print", choices=["url", "branch", "requirement"], dest="show")
    p.add_argument("--branch", help="with --set-url: also set repository.branch")
    p.add_argument("--root", type=Path, default=ROOT, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.branch is not None and args.set_url is None:
        p.error("--branch goes with --set-url")
    try:
        if args.show:
            repo = repository(args.root)
            print({"url": repo.url, "branch": repo.branch, "requirement": repo.requirement}[args.show])
        elif args.check:
            changes, reasons = planned(args.root)
            for rel in changes:
                print(f"{rel}: {reasons[rel]}", file=sys.stderr)
            if changes:
                print(f"{len(changes)} file(s) out of date with the repository block of _config.yml or with "
                      "requirements.txt: run `make launch`", file=sys.stderr)  # fmt: skip
                return 1
        else:
            if args.set_url is not None:
                set_url(args.set_url, args.branch, args.root)
                print(f"_config.yml: repository {repository(args.root).url} @ {repository(args.root).branch}")
            for rel in write(args.root):
                print(f"wrote {rel}")
    except LaunchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
