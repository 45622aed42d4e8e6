"""Quantized projections of the torch backend (FP8 W8A8, INT8 SmoothQuant W8A8, INT8/INT4
weight-only): the packed weight layouts (:mod:`.layout`), PyTorch references
(:mod:`.triton_reference`) and GPU kernels (:mod:`.triton_kernels`)."""

# FP8 inputs of more rows than this go to cuBLASLt after a quantization pass of their own (the
# kernels' path choice), which the kernel before the projection can do instead: the reference
# mirrors that choice (fp8_takes_quantized), so the CPU runs the same fused path.
FP8_TRITON_MAX_M = 64
