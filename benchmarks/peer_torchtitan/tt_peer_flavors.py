"""Registers flavors "16B_sdpa" and "16B_sdpa_14l" in torchtitan 0.2.2's deepseek_v3 model table (loaded by
--experimental.custom_import).

torchtitan's published "16B" flavor (the DeepSeek-V2-Lite shape) attends with FlexAttention under a per-document
("block_causal") mask. Our `deepseek16b` workload attends with SDPA under a plain causal mask over the whole
4,096-token row. "16B_sdpa" is torchtitan's own "16B" arguments with only those two fields changed, so both systems
do the same attention work; every other field (shape, MoE routing, initialisation) stays torchtitan's.
"16B_sdpa_14l" is the same at 14 layers (1 dense + 13 MoE), our `deepseek16b_14l` workload: it fits 2 GPUs, where
the full depth with fp32 Adam moments does not.
"""

from __future__ import annotations

import copy
import dataclasses

from torchtitan.models.deepseek_v3 import deepseekv3_args

_base = deepseekv3_args["16B"]
deepseekv3_args["16B_sdpa"] = dataclasses.replace(
    _base,
    attn_type="sdpa",
    attn_mask_type="causal",
    moe_args=copy.deepcopy(_base.moe_args),  # the trainer mutates moe_args in place; keep "16B"'s untouched
)
deepseekv3_args["16B_sdpa_14l"] = dataclasses.replace(
    deepseekv3_args["16B_sdpa"], n_layers=14, moe_args=copy.deepcopy(_base.moe_args)
)
