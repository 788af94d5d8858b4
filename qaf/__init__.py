"""qaf: reproducible post-training compression experiments on CNNs.

Quantization Aware Factorization (CP decompositions with quantized factors found by ADMM),
compared against factorize-then-quantize, PTQ and LAPQ.
"""

__version__ = "0.1.0"
