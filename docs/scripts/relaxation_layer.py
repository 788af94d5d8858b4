"""AO-ADMM with and without over-relaxation on ResNet-18 layer3.1.conv1 at rate 1.2 (docs/qaf_solvers.md).

Random-init weights (seed 42, as the paper-grid bench), the method's EPC start and grids, one thread.
Prints the error after 10, 20 and 40 outer sweeps and the final one for alpha = 1 and 1.8 at 4 and 8 bits.
"""
import time

import torch
import torchvision

from qaf.decomp import cp_als, cp_epc, cp_rank, weight_to_tensor
from qaf.decomp.admm import cp_admm
from qaf.methods.cp import CP

torch.set_num_threads(1)
torch.manual_seed(42)
tensor = weight_to_tensor(torchvision.models.resnet18().layer3[1].conv1.weight.detach())
rank = cp_rank(tensor.shape, 1.2)
method = CP(bits=4, init="epc", solver="admm")
als = cp_als(tensor, rank, n_iter=50, tol=1e-7, generator=torch.Generator().manual_seed(42))
start = cp_epc(tensor, als.factors, n_iter=method.epc_sweeps(rank), tol=1e-6).factors
for bits in (4, 8):
    grid_factory = CP(bits=bits, init="epc", solver="admm").grid_factory
    for alpha in (1.0, 1.8):
        t = time.perf_counter()
        res = cp_admm(tensor, start, grid_factory, max_outer=100, max_inner=10, patience=5, relaxation=alpha)
        at = " ".join(f"{k}: {res.history[k]:.4f}" for k in (10, 20, 40) if k < len(res.history))
        print(f"{bits} bits, alpha {alpha}: {at}; final {res.e_quant:.4f} after {res.iterations} sweeps, "
              f"{time.perf_counter() - t:.1f} s", flush=True)
