"""Low-bit weights: bit packing, RTN and GPTQ quantisers, ``QuantLinear``, EoRA compensation, ``rankwise.quantize``."""

from rankwise.quantization.api import METHODS, QuantizeConfig, QuantizeResult, quantize
from rankwise.quantization.io import export_dense, is_quantized_folder, load_quantized, save_quantized, to_dense
from rankwise.quantization.layer import QuantLinear, QuantLowRank, QuantSelect
from rankwise.quantization.pack import SUPPORTED_BITS, pack, unpack

__all__ = [
    "METHODS",
    "SUPPORTED_BITS",
    "QuantLinear",
    "QuantLowRank",
    "QuantSelect",
    "QuantizeConfig",
    "QuantizeResult",
    "export_dense",
    "is_quantized_folder",
    "load_quantized",
    "pack",
    "quantize",
    "save_quantized",
    "to_dense",
    "unpack",
]
