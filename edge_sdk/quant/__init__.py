"""Quantization of the Ministral 3 text decoder: INT4 (block-wise, AWQ-style scaling) and FP8 (E4M3).

    from edge_sdk.quant import QuantRecipe, quantize, format_report
    qm = quantize(open_checkpoint(path), QuantRecipe(method="int4", block_size=128), encode=tok.encode)
    print(format_report(qm.report))
    logits, _ = ministral3.forward(qm, qm.config.text, ids)   # dequantized reference
"""

from .awq import AwqGroup, AwqResult, awq_layer, layer_groups, search_scale
from .fp8 import E4M3_MAX, Fp8Linear, activation_scale, fp8_fake_quant, quantize_fp8, to_e4m3
from .int4 import Int4Linear, pack_int4, quantize_int4, unpack_int4
from .quantize import (LayerReport, QuantizedModel, calibration_ids, calibration_text, format_report, quantize,
                       sqnr_db, summarize)
from .recipe import QuantRecipe

__all__ = [
    "AwqGroup", "AwqResult", "E4M3_MAX", "Fp8Linear", "Int4Linear", "LayerReport", "QuantRecipe", "QuantizedModel",
    "activation_scale", "awq_layer", "calibration_ids", "calibration_text", "format_report", "fp8_fake_quant",
    "layer_groups", "pack_int4", "quantize", "quantize_fp8", "quantize_int4", "search_scale", "sqnr_db",
    "summarize", "to_e4m3", "unpack_int4",
]
