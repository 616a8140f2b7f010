"""Check the set-up: torch and torchvision are the matched pair and torchvision's compiled ops work."""

import sys

import torch
import torchvision
import torchvision.ops

boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0], [2.0, 2.0, 3.0, 3.0]])
keep = torchvision.ops.nms(boxes, torch.tensor([0.9, 0.8, 0.7]), 0.5)
if keep.tolist() != [0, 2]:
    sys.exit(f"torchvision.ops.nms gave {keep.tolist()}; the torch/torchvision pair is broken")
print(f"torch {torch.__version__}, torchvision {torchvision.__version__}: compiled ops work")
