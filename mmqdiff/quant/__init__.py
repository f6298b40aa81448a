"""Q-Diffusion-style fake quantization of the ddim UNet: quantizers, quantized layers/blocks, ``quantize_model``,
``calibrate`` (BRECQ/AdaRound in one call), ``init_activation_ranges``, quant state I/O, packed export and the integer
runtime (``to_integer``, ``IntegerSegments``). Imports nothing of Lightning."""
from .blocks import QuantAttnBlock, QuantResnetBlock
from .calibration import ItemDone, ResumePoint, SegmentCalibrator, calibrate, init_activation_ranges
from .export import dequantize_packed, export_packed, load_packed, packed_nbytes
from .integer import IntegerUNet, IntegerUnsupported, resident_nbytes, share_constants, to_integer
from .model import (QuantizedUNet, config_from_state, decoder_split_points, load_quant_state, quant_state_dict,
                    quantize_model)
from .modules import (QuantConfig, QuantLayer, act_quantizers, adaround_quantizers, init_adaround, quant_layers,
                      reset_act_quantizers, set_quant_state, set_rounding, soften_adaround)
from .quantizers import AdaRoundQuantizer, LinearTempDecay, UniformAffineQuantizer
from .reconstruction import ReconSettings, WarmStart
from .segment_runtime import IntegerSegments

__all__ = ["QuantConfig", "QuantizedUNet", "quantize_model", "calibrate", "init_activation_ranges", "ReconSettings",
           "WarmStart", "SegmentCalibrator", "ResumePoint", "ItemDone", "QuantLayer", "QuantResnetBlock",
           "QuantAttnBlock", "UniformAffineQuantizer", "AdaRoundQuantizer", "LinearTempDecay", "set_quant_state",
           "set_rounding", "init_adaround", "soften_adaround", "adaround_quantizers", "act_quantizers",
           "reset_act_quantizers", "quant_layers", "quant_state_dict", "load_quant_state", "config_from_state",
           "decoder_split_points", "export_packed", "packed_nbytes", "dequantize_packed", "load_packed", "to_integer",
           "share_constants", "resident_nbytes", "IntegerUNet", "IntegerSegments", "IntegerUnsupported"]
