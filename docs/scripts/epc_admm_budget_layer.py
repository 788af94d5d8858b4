"""Where a ResNet-18 layer's solver budget pays: EPC sweeps against AO-ADMM sweeps (docs/qaf_solvers.md).

Random-init weights (seed 42, as the paper-grid bench), layer3.1.conv1 (256x256x3x3) at rate 1.2 (rank
943; ``--layer layer4.1.conv1`` for rank 1,903, about 15 minutes), one thread. The method's ALS start,
then EPC with one Newton step per block (``method.epc_one_step``) for 50, 75 and 100 sweeps (and 50
solved to convergence, the default), then AO-ADMM at 4/6/8 bits (alpha 1.8) from each. Prints per EPC
start its time, ||lambda||, the CPD-EPC error at 4 bits and the best ADMM error after 8, 10, 15, 25
and 40 outer sweeps.

    PYTHONPATH=. python docs/scripts/epc_admm_budget_layer.py [--layer layer4.1.conv1]
"""
import argparse
import time

import torch
import torchvision

from qaf.decomp import cp_als, cp_epc, cp_rank, relative_error, weight_to_tensor
from qaf.decomp.admm import cp_admm
from qaf.methods.cp import CP

parser = argparse.ArgumentParser()
parser.add_argument("--layer", default="layer3.1.conv1")
args = parser.parse_args()
torch.set_num_threads(1)
torch.manual_seed(42)
conv = dict(torchvision.models.resnet18().named_modules())[args.layer]
tensor = weight_to_tensor(conv.weight.detach())
rank = cp_rank(tensor.shape, 1.2)
grids = {bits: CP(bits=bits, init="epc", solver="admm").grid_factory for bits in (4, 6, 8)}
als = cp_als(tensor, rank, n_iter=50, tol=1e-7, generator=torch.Generator().manual_seed(42))
print(f"{args.layer}, rank {rank}: ALS error {als.error:.6f}", flush=True)
for sweeps, one_step in ((50, False), (50, True), (75, True), (100, True)):
    t = time.perf_counter()
    epc = cp_epc(tensor, als.factors, n_iter=sweeps, tol=1e-6, one_step=one_step)
    seconds = time.perf_counter() - t
    cpd4 = relative_error(tensor, [grids[4](f)(f) for f in epc.factors])
    line = (f"EPC {sweeps} sweeps{' one-step' if one_step else ''} ({seconds:.1f} s): ||lambda|| "
            f"{epc.history[-1]:.4f}, cpd_epc 4 bits {cpd4:.5f}; admm_epc after 8/10/15/25/40 sweeps:")
    for bits in (4, 6, 8):
        history = cp_admm(tensor, epc.factors, grids[bits], max_outer=40, max_inner=10, patience=5,
                          relaxation=1.8).history
        line += f" {bits} bits " + "/".join(f"{min(history[:k + 1]):.5f}" for k in (8, 10, 15, 25, 40)
                                            if k < len(history)) + ";"
    print(line, flush=True)
