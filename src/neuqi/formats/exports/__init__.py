"""Export a packed neuqi model to other formats.

* ``export_fp16``: a plain Hugging Face model directory with the dequantized weights Ŵ = s·(q − Z) cast to
  fp16 (or bf16/fp32): evaluate anywhere; no compression.
* ``export_hqq``: HQQ's native layout (``config.json`` + ``qmodel.pt``, loadable with
  ``hqq.models.hf.base.AutoHQQHFModel.from_quantized``). HQQ dequantizes W = (W_q − zero)·scale with a float
  zero, so our (s, Z) map over exactly (scale = s, zero = Z, axis = 1: groups along the input dim). Lossless.
* ``export_gguf_q4_1``: a llama.cpp GGUF file with Q4_1 blocks (32 weights, fp16 d and m, w = d·q + m) for
  every layer with bits ≤ 4 and a group size that is a multiple of 32: d = s, m = fp16(−s·Z). The codes are
  ours unchanged; the only loss is rounding m = −s·Z to fp16: |error| ≤ 2^-11·|s·Z|, i.e. at most |Z|·2^-11
  quantization steps (≈ 0.004 step for Z ≈ 7.5), far below the quantization error itself (~0.29 step RMS).
* ``export_gptq``: an integer zero-point, GPTQ-like layout for engines that cannot take a float zero-point.
  Explicitly LOSSY: Z is rounded to an integer in [0, M] and the codes re-chosen by RTN with the stored
  scales; the per-layer weight MSE this adds is returned and should be reported.
* ``export_mlx``: an mlx-lm model directory (MLX affine mode, w = scale·q + bias with bias = −s·Z; bits 2..6, 8;
  groups 32/64/128; per-layer overrides for mixed precision). Exact with fp32 scales/biases; with fp16 (the
  default, mlx-lm's size) the bias is rounded: at most |Z|·2^-11 quantization steps.
"""


from .fp16 import export_fp16
from .gguf import export_gguf_q4_1, q4_1_blocks
from .gptq import LayerLoss, export_gptq, gptq_layer, total_loss
from .hqq import export_hqq, hqq_layer_state
from .mlx import export_mlx, mlx_layer_tensors, mlx_quantization_config

__all__ = ["LayerLoss", "export_fp16", "export_gguf_q4_1", "export_gptq", "export_hqq", "export_mlx", "gptq_layer",
           "hqq_layer_state", "mlx_layer_tensors", "mlx_quantization_config", "q4_1_blocks", "total_loss"]
