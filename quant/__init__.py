"""localmix.quant: affine group quantization of weights (MLX-compatible 4/8-bit), the quantized
on-disk format and the converter behind `localmix pull`. Empty until the quantizer issue lands."""
