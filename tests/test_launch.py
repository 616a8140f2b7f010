"""Launch buttons and hosting. The repository block of _config.yml is the one place that says where the
book lives; every chapter's Colab install cell and Binder's requirements follow from it and from the lock
(tools/launch.py); the GitHub Actions workflow runs the make targets the README documents; the pre-commit
hooks match the lock."""

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import launch
import pytest
import yaml
from book import ROOT, chapters
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = launch.repository()
LOCK = launch.parse_lock((ROOT / "requirements.txt").read_text())
README = (ROOT / "README.md").read_text()
MAKEFILE = (ROOT / "Makefile").read_text()
WORKFLOW = ROOT / ".github" / "workflows" / "book.yml"


def code_cells(path):
    return [c for c in json.loads((ROOT / path).read_text())["cells"] if c["cell_type"] == "code"]


# ----------------------------------------------------------------------------------- one source


def test_repository_block_names_a_github_repository_and_the_buttons_use_it():
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    assert launch.GITHUB_URL.fullmatch(REPO.url) and REPO.branch
    assert config["html"]["use_repository_button"] is True
    assert config["launch_buttons"]["binderhub_url"] and config["launch_buttons"]["colab_url"]
    assert REPO.requirement == f"sensitivity_lib[book] @ git+{REPO.url}@{REPO.branch}"


def _project_files() -> list[Path]:
    """The project's own files: what git tracks and what it would add (not what it ignores, such as
    the ``.egg-info`` that an editable install writes from the README); every file outside the
    usual build folders where the tree is not a git checkout."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT, capture_output=True, check=True,
        ).stdout  # fmt: skip
        return [ROOT / n for n in out.decode().split("\0") if n and (ROOT / n).is_file()]
    except (OSError, subprocess.CalledProcessError):
        skip = {".git", ".venv", "_build", "_cache", "node_modules", ".pytest_cache", ".ruff_cache",
                ".hypothesis"}  # fmt: skip
        files = []
        for folder, dirs, names in os.walk(ROOT):
            dirs[:] = [d for d in dirs if d not in skip and not d.endswith(".egg-info")]
            files += [Path(folder) / n for n in names]
        return files


def test_nothing_else_hard_codes_the_repository_url():
    """A fork changes the URL in _config.yml (`make repository URL=...`); only what `make launch` writes
    and the README's description of the default may repeat it."""
    found = []
    for path in _project_files():
        rel = path.relative_to(ROOT)
        if path.stat().st_size > 2_000_000:
            continue
        if str(rel) in ("_config.yml", "README.md"):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        if REPO.url not in text:
            continue
        if path.suffix == ".ipynb":
            cells = json.loads(text)["cells"]
            if any(REPO.url in "".join(c["source"]) for c in cells if not launch.is_colab_cell(c)):
                found.append(str(rel))
        else:
            found.append(str(rel))
    assert not found, f"{found} repeat {REPO.url}: read it from _config.yml (tools/launch.py) instead"


def test_everything_that_follows_from_it_is_up_to_date():
    changes, reasons = launch.planned(ROOT)
    assert not changes, "run `make launch`: " + "; ".join(f"{p}: {reasons[p]}" for p in changes)


# ----------------------------------------------------------------------------------- Colab


@pytest.mark.parametrize("path", chapters(), ids=str)
def test_chapter_has_the_colab_cell_right_after_the_parameters_cell(path):
    code = code_cells(path)
    assert "parameters" in code[0]["metadata"].get("tags", [])
    cell = code[1]
    assert cell.get("id") == launch.CELL_ID, f"{path}: the second code cell is not the Colab install cell"
    assert "".join(cell["source"]) == launch.colab_source(REPO), f"{path}: Colab cell differs: `make launch`"
    assert "remove-cell" in cell["metadata"].get("tags", [])
    assert sum(launch.is_colab_cell(c) for c in code) == 1
    assert "import sensitivity_lib" not in "".join(c for cell in code[:2] for c in cell["source"])


def run_cell(ns=None):
    exec(compile(launch.colab_source(REPO), "<colab cell>", "exec"), ns if ns is not None else {})


@pytest.fixture
def not_colab(monkeypatch):
    monkeypatch.delenv("COLAB_RELEASE_TAG", raising=False)
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)

    def no_subprocess(*a, **k):
        raise AssertionError(f"the Colab cell ran a command outside Colab: {a}")

    monkeypatch.setattr(subprocess, "run", no_subprocess)


def test_colab_cell_does_nothing_here(not_colab, capsys):
    ns = {}
    run_cell(ns)
    assert set(ns) == {"__builtins__"}, "the cell must leave no names behind"
    assert capsys.readouterr() == ("", "")


def test_colab_cell_does_nothing_in_colab_once_the_library_is_installed(not_colab, monkeypatch, capsys):
    monkeypatch.setenv("COLAB_RELEASE_TAG", "test")  # sensitivity_lib is importable here
    run_cell()
    assert capsys.readouterr() == ("", "")


@pytest.fixture
def colab_without_library(monkeypatch):
    """Colab's environment as the cell sees it: the marker variable set, sensitivity_lib not found, and pip
    replaced by a recorder that answers with ``calls.returncode`` (0 unless a test sets it)."""
    import importlib.util

    monkeypatch.setenv("COLAB_RELEASE_TAG", "test")
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "sensitivity_lib" else real(name, *a)
    )

    class Calls(list):
        returncode = 0

    calls = Calls()

    def fake_run(cmd, **kw):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, calls.returncode, "pip says", "pip complains")

    monkeypatch.setattr(subprocess, "run", fake_run)
    return calls


def test_colab_cell_installs_the_library_from_the_configured_repository(colab_without_library, capsys):
    run_cell()
    assert colab_without_library == [[sys.executable, "-m", "pip", "install", "--quiet", REPO.requirement]]
    out = capsys.readouterr().out
    assert REPO.requirement in out and out.strip().endswith("installed")


def test_colab_cell_reports_a_failed_install(colab_without_library):
    colab_without_library.returncode = 1
    with pytest.raises(RuntimeError, match="(?s)could not install .*pip complains"):
        run_cell()


def test_colab_cell_asks_for_a_restart_if_pip_changed_an_imported_package(colab_without_library, monkeypatch):
    import numpy  # noqa: F401  (imported, as it is in a Colab session)

    real = metadata.version
    monkeypatch.setattr(
        metadata, "version", lambda d: "0.new" if colab_without_library and d == "numpy" else real(d)
    )
    with pytest.raises(RuntimeError, match=r"pip changed .*numpy.*restart the session"):
        run_cell()


# ----------------------------------------------------------------------------------- the tool itself


@pytest.fixture
def book_copy(tmp_path):
    """The book's configuration and chapters in a temporary folder, with every Colab cell removed."""
    for name in ("_config.yml", "_toc.yml", "requirements.txt"):
        shutil.copy(ROOT / name, tmp_path / name)
    for ch in chapters():
        text = (ROOT / ch).read_text()
        nb = json.loads(text)
        nb["cells"] = [c for c in nb["cells"] if not launch.is_colab_cell(c)]
        (tmp_path / ch).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / ch).write_text(launch.dumps(nb, like=text))
    return tmp_path


def test_write_inserts_only_the_cell_and_a_rerun_changes_nothing(book_copy, capsys):
    before = {ch: json.loads((book_copy / ch).read_text()) for ch in chapters()}
    assert launch.main(["--root", str(book_copy), "--check"]) == 1
    assert "has no Colab install cell" in capsys.readouterr().err
    written = launch.write(book_copy)
    assert set(written) == set(chapters()) | {launch.BINDER_REQUIREMENTS}
    for ch in chapters():
        nb = json.loads((book_copy / ch).read_text())
        i = next(i for i, c in enumerate(nb["cells"]) if "parameters" in c["metadata"].get("tags", []))
        assert nb["cells"][i + 1]["id"] == launch.CELL_ID
        assert nb["cells"][: i + 1] + nb["cells"][i + 2 :] == before[ch]["cells"]
        assert nb["metadata"] == before[ch]["metadata"] and nb["nbformat"] == before[ch]["nbformat"]
    snapshot = {ch: (book_copy / ch).read_bytes() for ch in chapters()}
    assert launch.write(book_copy) == [] and launch.main(["--root", str(book_copy), "--check"]) == 0
    assert snapshot == {ch: (book_copy / ch).read_bytes() for ch in chapters()}


def test_set_url_changes_the_config_and_every_cell(book_copy):
    launch.write(book_copy)
    old = (book_copy / "_config.yml").read_text().splitlines()
    url = "https://github.com/a-teacher/sensitivity-course"
    assert launch.main(["--root", str(book_copy), "--set-url", url, "--branch", "spring"]) == 0
    new = (book_copy / "_config.yml").read_text().splitlines()
    changed = [(a, b) for a, b in zip(old, new, strict=True) if a != b]
    assert [b.strip() for _, b in changed] == [f"url: {url}", "branch: spring"], changed
    repo = launch.repository(book_copy)
    for ch in chapters():
        cells = json.loads((book_copy / ch).read_text())["cells"]
        src = "".join(next(c for c in cells if c.get("id") == launch.CELL_ID)["source"])
        assert f"git+{url}@spring" in src and REPO.url not in src and src == launch.colab_source(repo)
    assert launch.main(["--root", str(book_copy), "--check"]) == 0


def test_check_catches_a_url_changed_by_hand(book_copy, capsys):
    launch.write(book_copy)
    cfg = book_copy / "_config.yml"
    cfg.write_text(cfg.read_text().replace(REPO.url, "https://github.com/someone/else"))
    assert launch.main(["--root", str(book_copy), "--check"]) == 1
    err = capsys.readouterr().err
    assert all(str(ch) in err for ch in chapters()) and "make launch" in err


@pytest.mark.parametrize(
    "url", ["https://gitlab.com/a/b", "https://github.com/a/b/", "https://github.com/a/b.git",
            "git@github.com:a/b", "https://github.com/a", ""],
)  # fmt: skip
def test_a_bad_url_is_refused_with_a_clear_message(book_copy, capsys, url):
    before = (book_copy / "_config.yml").read_text()
    assert launch.main(["--root", str(book_copy), "--set-url", url]) == 2
    assert "https://github.com/OWNER/NAME" in capsys.readouterr().err
    assert (book_copy / "_config.yml").read_text() == before


def test_a_notebook_without_parameters_cell_is_refused(book_copy):
    ch = chapters()[0]
    nb = json.loads((book_copy / ch).read_text())
    for c in nb["cells"]:
        c["metadata"].pop("tags", None)
    (book_copy / ch).write_text(json.dumps(nb, indent=1))
    with pytest.raises(launch.LaunchError, match="exactly one code cell tagged `parameters`"):
        launch.write(book_copy)


@pytest.mark.parametrize("path", chapters(), ids=str)
def test_rewriting_keeps_the_notebooks_json_style(path):
    text = (ROOT / path).read_text()
    assert launch.dumps(json.loads(text), like=text) == text


# ----------------------------------------------------------------------------------- Colab's packages


def third_party_imports() -> set[str]:
    mods = set()
    sources = [p.read_text() for p in (ROOT / "sensitivity_lib").rglob("*.py")]
    for ch in chapters():
        for c in code_cells(ch):
            if not launch.is_colab_cell(c):
                lines = "".join(c["source"]).splitlines()
                sources.append("\n".join(x for x in lines if not x.lstrip().startswith(("%", "!"))))
    for src in sources:
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, ast.Import):
                mods |= {a.name.partition(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                mods.add(node.module.partition(".")[0])
        # packages read for their data files, e.g. _package_file("advertorch_examples", ...)
        mods |= set(re.findall(r"_package_(?:file|dir)\(\s*\"([A-Za-z0-9_]+)\"", src))
    return {m for m in mods if m not in sys.stdlib_module_names and m != "sensitivity_lib"}


def pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_sensitivity_lib_book_installs_everything_the_chapters_import():
    """What Colab gets from `sensitivity_lib[book]`: the library's dependencies, the book extra, and what
    those depend on."""
    project = pyproject()
    todo = [Requirement(r).name for r in project["dependencies"] + project["optional-dependencies"]["book"]]
    closure = set()
    while todo:
        name = canonicalize_name(todo.pop())
        if name in closure:
            continue
        closure.add(name)
        for r in map(Requirement, metadata.requires(name) or []):
            if r.marker is None or r.marker.evaluate({"extra": ""}):
                todo.append(r.name)
    owners = metadata.packages_distributions()
    missing = {}
    for mod in sorted(third_party_imports()):
        dists = {canonicalize_name(d) for d in owners.get(mod, [])}
        assert dists, f"{mod} is imported but no installed distribution provides it"
        if not dists & closure:
            missing[mod] = sorted(dists)
    assert not missing, f"add to [project.optional-dependencies] book in pyproject.toml: {missing}"


def test_book_extra_is_in_the_lock():
    names = {canonicalize_name(Requirement(r).name) for r in pyproject()["optional-dependencies"]["book"]}
    assert names <= {canonicalize_name(n) for n in LOCK}, names - set(LOCK)


# ----------------------------------------------------------------------------------- Binder


def binder_pins():
    lines = (ROOT / launch.BINDER_REQUIREMENTS).read_text().splitlines()
    return lines, dict(line.split("==") for line in lines if line and not line.startswith(("#", "-")))


def test_binder_requirements_are_written_from_the_lock():
    want = launch.binder_requirements((ROOT / "requirements.txt").read_text())
    assert (ROOT / launch.BINDER_REQUIREMENTS).read_text() == want, "run `make launch`"


def test_binder_environment_is_the_lock_on_cpu():
    lines, pins = binder_pins()
    assert f"--extra-index-url {launch.CPU_INDEX}" in lines
    for name in ("torch", "torchvision"):
        assert pins[name] == LOCK[name][0].split("+")[0] + "+cpu"
    assert not [n for n in pins if n.startswith(("nvidia", "cuda")) or n == "triton"]
    dropped = {n for n in LOCK if n not in pins}
    assert dropped and all(launch.is_cuda(n) for n in dropped)
    for n in dropped:  # nothing but torch's CUDA build needs what Binder leaves out
        assert set(LOCK[n][1]) <= dropped | {"torch"}, (n, LOCK[n][1])
    assert all(pins[n] == v for n, (v, _) in LOCK.items() if n not in dropped | {"torch", "torchvision"})


def test_binder_refuses_to_drop_a_package_something_else_needs():
    lock = ("torch==2.0\n    # via -r requirements.in\ntorchvision==0.1\n"
            "triton==3.0\n    # via\n    #   torch\n    #   mylib\n")
    with pytest.raises(launch.LaunchError, match="triton is needed by .'mylib'."):
        launch.binder_requirements(lock)


def test_binder_post_build_installs_the_library():
    post = ROOT / "binder" / "postBuild"
    assert os.access(post, os.X_OK), "binder/postBuild must be executable"
    text = post.read_text()
    assert re.search(r"^python -m pip install --no-deps .*-e \.$", text, re.M), text
    assert "set -euo pipefail" in text
    subprocess.run(["bash", "-n", str(post)], check=True)
    runtime = (ROOT / "binder" / "runtime.txt").read_text().strip()
    assert runtime == "python-3.11" and "--python 3.11" in MAKEFILE


# ----------------------------------------------------------------------------------- GitHub Actions


def workflow():
    wf = yaml.safe_load(WORKFLOW.read_text())
    wf["on"] = wf.pop(True, wf.get("on"))  # YAML 1.1 reads the key `on` as True
    return wf


def steps(job):
    return workflow()["jobs"][job]["steps"]


def uses(job, action):
    found = [s for s in steps(job) if s.get("uses", "").startswith(action + "@")]
    assert found, f"job {job} does not use {action}"
    return found


def test_workflow_tests_every_push_and_pull_request():
    wf = workflow()
    assert {"push", "pull_request"} <= set(wf["on"])
    runs = [s.get("run", "") for s in steps("build")]
    i_test = next(i for i, r in enumerate(runs) if r.strip() == "make test")
    i_book = next(i for i, r in enumerate(runs) if r.strip() == "make book")
    assert i_test < i_book
    assert "publish" in steps("build")[i_book]["if"]
    assert uses("build", "actions/setup-python")[0]["with"]["python-version"] == "3.11"


def test_workflow_runs_the_make_targets_the_readme_documents():
    targets = set(re.findall(r"^([a-z][a-z-]*):", MAKEFILE, re.M))
    used = {m for s in steps("build") for m in re.findall(r"\bmake (\w+)", s.get("run", ""))}
    assert {"test", "book"} <= used
    for t in used:
        assert t in targets and f"make {t}" in README, f"make {t}: not a documented Makefile target"
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci


def test_workflow_carries_the_execution_cache_between_runs():
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    restore = uses("build", "actions/cache/restore")[0]
    save = uses("build", "actions/cache/save")[0]
    paths = set(restore["with"]["path"].split())
    assert {config["execute"]["cache"], "_build/.library-hash", "_cache"} <= paths
    assert set(save["with"]["path"].split()) == paths
    assert restore["with"]["restore-keys"].strip() and "cache-primary-key" in save["with"]["key"]
    assert "steps.book" in save["if"]  # saved after `make book` ran


def test_workflow_publishes_the_html_to_pages():
    (upload,) = uses("build", "actions/upload-pages-artifact")
    assert upload["with"]["path"] == "_build/html" and "publish" in upload["if"]
    deploy = workflow()["jobs"]["deploy"]
    assert deploy["permissions"] == {"pages": "write", "id-token": "write"}
    assert "needs.build.outputs.publish" in deploy["if"] and uses("deploy", "actions/deploy-pages")
    assert deploy["environment"]["name"] == "github-pages"
    site = next(s for s in steps("build") if s.get("id") == "site")
    assert "tools/launch.py --print branch" in site["run"]  # publishes from the branch _config.yml names


# ----------------------------------------------------------------------------------- pre-commit


def test_pre_commit_strips_notebooks_and_runs_ruff_as_make_lint_does():
    hooks = {h["id"]: h for r in yaml.safe_load((ROOT / ".pre-commit-config.yaml").read_text())["repos"]
             for h in r["hooks"]}  # fmt: skip
    assert set(hooks) == {"nbstripout", "ruff"}
    for hook_id, pkg in (("nbstripout", "nbstripout"), ("ruff", "ruff")):
        assert hooks[hook_id]["additional_dependencies"] == [f"{pkg}=={LOCK[pkg][0]}"], "pin as the lock"
    assert "--keep-id" in hooks["nbstripout"]["args"]  # tools/launch.py finds its cell by id
    lint = re.search(r"ruff check ([^\n]+)", MAKEFILE).group(1).split()
    assert hooks["ruff"]["entry"] == "ruff check"
    assert hooks["ruff"]["files"] == "^(" + "|".join(lint) + ")/"
    assert "pre-commit" in LOCK and ".venv/bin/pre-commit install" in README


def test_readme_says_how_to_teach_with_and_host_the_book():
    for heading in ("## Teaching with it", "## Hosting", "## Contributing"):
        assert heading in README
    for words in ("make repository URL=", "make launch", "GitHub Actions", "binder/", "Colab", "JupyterHub"):
        assert words in README, words
