"""CP decomposition of layer weights: ALS, error-preserving correction, quantized AO-ADMM, CP layers."""

from qaf.decomp.admm import ADMMResult, cp_admm
from qaf.decomp.cp import (
    CPResult,
    MttkrpPlan,
    balance_factors,
    cp_als,
    cp_rank,
    cp_to_tensor,
    init_factors,
    max_rate,
    relative_error,
    weight_to_tensor,
)
from qaf.decomp.epc import EPCResult, cp_epc
from qaf.decomp.layers import CPConv2d, CPLinear

__all__ = [
    "ADMMResult",
    "CPConv2d",
    "CPLinear",
    "CPResult",
    "EPCResult",
    "MttkrpPlan",
    "balance_factors",
    "cp_admm",
    "cp_als",
    "cp_epc",
    "cp_rank",
    "cp_to_tensor",
    "init_factors",
    "max_rate",
    "relative_error",
    "weight_to_tensor",
]
