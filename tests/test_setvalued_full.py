"""Chapter 12's ``full`` profile (the paper's ResNet-56 on CIFAR-10, data supplied by the user) up to
its training: without the CIFAR-10 files it stops at once, naming the missing file; with them (here a
tiny fake CIFAR-10 in the official python-pickle format) its data path builds the ResNet-56 problem.

The chapter's own code cells run (parameters, imports and ``setup``, the network and data cell), with
``PROFILE = "full"`` and the sizes of the full profile unchanged; the cell after them (the L-BFGS fit,
hours on a CPU) does not.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib
import pytest
import torch
from helpers import write_fake_cifar10

CHAPTER = Path(__file__).resolve().parents[1] / "chapters" / "part4" / "12_matrix_free.ipynb"


def data_path_cells() -> list[str]:
    """The chapter's code cells up to and including the one that loads the data and builds the
    loss (the Colab install cell, tagged remove-cell, left out)."""
    cells = [
        "".join(c["source"])
        for c in json.loads(CHAPTER.read_text())["cells"]
        if c["cell_type"] == "code" and "remove-cell" not in c["metadata"].get("tags", [])
    ]
    end = next(i for i, src in enumerate(cells) if "data.cifar10(" in src)
    assert "sv.fit(" not in cells[end], "the data cell must stop before the training"
    return cells[: end + 1]


def run_full_profile_data_path() -> dict:
    namespace: dict = {}
    threads = torch.get_num_threads()
    try:
        with matplotlib.rc_context():
            for i, src in enumerate(data_path_cells()):
                exec(compile(src, f"{CHAPTER.name}[{i}]", "exec"), namespace)
                if i == 0:  # the parameters cell; papermill's -p PROFILE full
                    namespace["PROFILE"] = "full"
    finally:
        torch.set_num_threads(threads)
    return namespace


def test_full_profile_without_cifar10_stops_naming_the_file(monkeypatch):
    monkeypatch.delenv("CIFAR10_ROOT", raising=False)
    with pytest.raises(FileNotFoundError, match=r"cifar-10-batches-py/data_batch_1.*\$CIFAR10_ROOT"):
        run_full_profile_data_path()


def test_full_profile_with_missing_batch_names_it(tmp_path, monkeypatch):
    write_fake_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_4").unlink()
    monkeypatch.setenv("CIFAR10_ROOT", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="data_batch_4' is missing"):
        run_full_profile_data_path()


def test_full_profile_data_path_on_a_fake_cifar10(tmp_path, monkeypatch):
    images, labels = write_fake_cifar10(tmp_path, per_batch=2)
    monkeypatch.setenv("CIFAR10_ROOT", str(tmp_path))
    ns = run_full_profile_data_path()
    cfg, loss, net = ns["cfg"], ns["loss"], ns["net"]
    assert (cfg.arch, cfg.dataset, cfg.blocks, cfg.width) == ("resnet", "cifar10", 9, 16)
    # all ten fake training images (the profile asks for 1,000), in batch order, as float64
    assert loss.x.shape == (10, 3, 32, 32) and loss.x.dtype == torch.float64
    assert torch.equal(loss.x, (torch.from_numpy(images).float() / 255).double())
    assert torch.equal(ns["labels"], torch.tensor(labels))
    # ResNet-56: 55 convolutions in 27 blocks plus the read-out; He et al. count 0.85M weights (with
    # zero-padding shortcuts); the two 1x1 convolution shortcuts and batch norm add about 3,000
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 1 + 2 * 27 + 2
    assert 0.85e6 < loss.p < 0.86e6
    assert not net.training  # eval mode: batch-norm statistics are fixed buffers
    value = float(loss(loss.w, loss.x))
    assert math.isfinite(value) and value > 0
