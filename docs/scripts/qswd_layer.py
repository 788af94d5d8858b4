"""QSWD on one real layer (ResNet-20 layer3.2.conv2): error, bits per weight and seconds per setting.

    python docs/scripts/qswd_layer.py        # the table in docs/qswd.md (1 thread, seed 0)
"""

import time

import torch

from qaf.decomp.qswd import qswd, weight_to_matrix
from qaf.decomp.qswd_layer import QSWDConv2d
from qaf.models.cifar_resnet import build

SETTINGS = [  # block, atoms, sparsity, dict bits, code bits, unit codes
    ("row", 16, 16, None, None, False), ("row", 16, 16, 4, 4, False), ("row", 32, 8, None, None, False),
    ("row", 32, 8, 2, 2, False), ("row", 32, 8, 3, 3, False), ("row", 32, 8, 4, 4, False),
    ("row", 32, 8, 8, 8, False), ("kernel", 64, 1, 8, None, True), ("kernel", 256, 1, 8, None, True),
    ("kernel", 64, 1, 8, 4, False), ("kernel", 64, 2, None, None, False), ("kernel", 64, 2, 4, 4, False),
    ("kernel", 256, 2, 8, 4, False), ("kernel", 9, 3, 4, 4, False),
]

torch.set_num_threads(1)
conv = build(20).layer3[2].conv2
print("| block | k | s | dict/code bits | start -> error | iters | bits/weight | seconds |")
print("|---|---|---|---|---|---|---|---|")
for block, k, s, dict_bits, code_bits, unit in SETTINGS:
    matrix = weight_to_matrix(conv.weight.detach(), block)
    start = time.perf_counter()
    res = qswd(matrix, k, s, dict_bits=dict_bits, code_bits=code_bits, unit_codes=unit,
               generator=torch.Generator().manual_seed(0))
    seconds = time.perf_counter() - start
    layer = QSWDConv2d(conv, res, block, weight_bits=8)
    bits = sum(n * b for name, n, b in layer.storage() if name != "bias") / conv.weight.numel()
    grids = f"{dict_bits or 'float'}/{'unit' if unit else code_bits or 'float'}"
    print(f"| {block} | {k} | {s} | {grids} | {res.history[0]:.3f} -> {res.error:.3f} | {res.iterations} | "
          f"{bits:.2f} | {seconds:.2f} |")
