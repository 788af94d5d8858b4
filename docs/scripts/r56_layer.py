"""Per-layer e_quant of cpd, cpd_epc and admm_epc on ResNet-56 layer3.8.conv2 at 4/6/8 bits (docs/qaf_solvers.md)."""
import time, torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from qaf.cache import FactorCache
from qaf.export.rerun import compose
from qaf.methods.base import CompressContext
from qaf.quant.policy import LayerPolicy
from qaf.models.cifar_resnet import build
torch.set_num_threads(1)
cache = FactorCache("multirun_outputs/.cache/r56_layer")
for name in ("cpd", "cpd_epc", "admm_epc"):
    for bits in (4, 6, 8):
        cfg = compose(f"method={name}", "method.include=[layer3.8.conv2]")
        t = time.perf_counter()
        ctx = CompressContext(None, torch.device("cpu"), LayerPolicy.from_config(OmegaConf.load("conf/policy/qaf.yaml")), cache, 42, False)
        r = instantiate(cfg.method, bits=bits, rate=2.0).compress(build(56), ctx)[0]
        print(f"{name:9s} {bits} e_float {r['e_float']:.4f} e_quant {r['e_quant']:.4f} outer {r['iterations']:3d} {time.perf_counter() - t:6.1f} s")
