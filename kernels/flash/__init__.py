"""The flash backend's pieces: torch's ``varlen_attn`` and what it can do (varlen.py), and one
planned call of it (calls.py). Importing this package imports ``torch.nn.attention.varlen``.
"""

from batchrun.kernels.flash.calls import VarlenCall, plan_call, run_call
from batchrun.kernels.flash.varlen import (
    FLASH_HEAD_DIMS,
    VarlenFeatures,
    VarlenKernel,
    lse_rows,
    torch_varlen,
)

__all__ = [
    "FLASH_HEAD_DIMS",
    "VarlenCall",
    "VarlenFeatures",
    "VarlenKernel",
    "lse_rows",
    "plan_call",
    "run_call",
    "torch_varlen",
]
