"""qaf: reproducible post-training compression experiments on CNNs.

Quantization Aware Factorization (CP decompositions with quantized factors found by ADMM),
compared against factorize-then-quantize, PTQ, LAPQ and QSWD.
"""

__version__ = "0.1.0"


def load(path, model=None):
    """Rebuild a compressed model from its ``model.qaf.safetensors`` file (see :mod:`qaf.export`).

    Parameters
    ----------
    path : str or Path
        A file written by a run with ``export=true`` or by ``python -m qaf.export RUN_DIR``.
    model : torch.nn.Module, optional
        The float architecture to fill (default: built from the config stored in the file).

    Returns
    -------
    torch.nn.Module
        The model in eval mode on the CPU; it computes the exported model's logits bit for bit.
    """
    from qaf.export.artifact import load as _load

    return _load(path, model)
