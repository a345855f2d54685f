"""CPU kernels (Numba) on MLX-layout packed weights. Each has a plain numpy twin, which the tests hold
it to and which `backend="numpy"` runs instead. The kernels release the GIL (nogil), so an expert
cache's background reads run beside them.

One module per concern, each read on its own:

    features      what runs: CPU features, LOCALMIX_KERNELS, the formats, tile and block sizes
    activations   activations quantized to int16 once per product, in the order the kernels read
    llvm_rows     the vector row products emitted as LLVM IR (AVX2 `vpmaddwd`, VNNI `vpdpwssd`),
                  one row by one token, or tiles of rows by tokens
    products      packed matrix products: a batch of matrices per call, vector or plain; dequantize
    exp           a float32 exp that vectorizes (SwiGLU, attention's softmax)
    experts       SwiGLU and the experts' feed-forward
    small_ops     routing, RMSNorm, rotary embedding, attention
    fused_decode  a decoded token's layer in three compiled calls
    warm          warm_up: compile (or load) the kernels before the first token

Callers use the names below (`kernels.matmul(...)`); the modules import each other's private
helpers by name.

Numba's cache checks only a kernel's own file: a kernel that calls into another module (fused_decode
into activations, products, experts and small_ops; products into llvm_rows) would keep the callee it
was compiled with when only the callee's file changes. So the cache folder is named by a digest of
this package's source (localmix/__init__.py): any edit here compiles afresh.
"""

from localmix.kernels.features import (BLOCK_BYTES, FORMATS, HALF_TO_FLOAT, PREFETCH, TILE, TILE_ROWS, WIDE_TILE,
                                       WIDE_VECTORS, amx_usable, cpu_features, has_vector_kernels, kernel_name,
                                       values_per_lane, vnni_instruction)
from localmix.kernels.activations import QuantizedActivations, quantize_activations
from localmix.kernels.llvm_rows import row_products
from localmix.kernels.products import (B, BLOCK, OUT_COL, OUT_ROW, ROWS, S, S_STRIDE, TOKENS, UNITS, W, W_STRIDE,
                                       X_ROW, Job, dequantize, matmul, matmul_batch, matmul_many, matmul_reference,
                                       matrix_row, run_jobs, runs_vector)
from localmix.kernels.experts import experts_ffn, swiglu, swiglu_reference
from localmix.kernels.small_ops import apply_rope, attend, kernel_cache, rms_norm, route_tokens
from localmix.kernels.fused_decode import attention_out, decode_attention, decode_experts, decode_qkv
from localmix.kernels.warm import warm_up
