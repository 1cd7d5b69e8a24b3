"""Triton kernels for paged attention with shared-prefix (cascade) support.

Plain functions with explicit tensor arguments; a backend wires them up. Importing this
package imports Triton (batchrun.kernels itself never does). On CPU tensors the kernels run
only under Triton's interpreter (``TRITON_INTERPRET=1`` set before this package is imported).

* ``store_kv``            — new keys / values into their cache slots
* ``paged_attention``     — varlen prefill chunks + decodes over paged keys, one launch
* ``prefix_attention``    — every group's queries over its shared prefix, one launch
* ``merge_attention``     — log-sum-exp merge of two partial attentions
  (``merge_attention_into``: in place into the full output at given rows)
* ``split_kv``            — split-KV for the two attention kernels (``num_splits``): when
  splitting pays, and the reduce launch that folds the splits

Cascade for a group's members: ``paged_attention(..., kv_start=prefix_len, return_lse=True)``
over their own keys, ``prefix_attention`` over the shared prefix, then
``merge_attention_into``. What is supported: ``capabilities.py``.
"""

from batchrun.kernels.triton._common import AttentionOutput
from batchrun.kernels.triton.capabilities import (
    CAPABILITIES,
    Capabilities,
    supported_block_size,
    supported_head_dim,
)
from batchrun.kernels.triton.merge import merge_attention, merge_attention_into
from batchrun.kernels.triton.paged_attention import paged_attention
from batchrun.kernels.triton.prefix_attention import prefix_attention
from batchrun.kernels.triton.store_kv import store_kv

__all__ = [
    "CAPABILITIES",
    "AttentionOutput",
    "Capabilities",
    "merge_attention",
    "merge_attention_into",
    "paged_attention",
    "prefix_attention",
    "store_kv",
    "supported_block_size",
    "supported_head_dim",
]
