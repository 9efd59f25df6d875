"""flashjit: exact, memory-light attention with a fused backward.

    o = flashjit.scaled_dot_product_attention(q, k, v, is_causal=True)   # SDPA drop-in
    o = flashjit.attention(q, k, v, causal="bottom_right", window=(256, 0), softcap=30.0)
    flashjit.patch_sdpa()   # route torch.nn.functional.scaled_dot_product_attention here

Tensors are torch tensors (differentiable, torch.compile-able) or numpy arrays;
flashjit reads and writes them in place, without copies.
"""

from . import _nvrtc

_nvrtc.configure()  # before the first kernel compile reads FLASHJIT_NVRTC

from . import cuda  # noqa: E402
from ._C import version as _version  # noqa: E402
from .api import attention, attention_backward, backends, dropout_keep_mask  # noqa: E402
from .cuda import precompile  # noqa: E402
from .profiler import profile  # noqa: E402

__version__ = _version()
__all__ = ["attention", "attention_backward", "backends", "cuda", "dropout_keep_mask", "precompile", "profile",
           "__version__"]

try:
    import torch as _torch  # noqa: F401  (the torch front end is optional)
except ImportError:
    pass
else:
    from . import ops  # registers torch.ops.flashjit.fwd and .bwd
    from .sdpa import patch_sdpa, scaled_dot_product_attention, sdpa_patched, unpatch_sdpa
    from .varlen import attention_with_kvcache, varlen_attention

    __all__ += ["scaled_dot_product_attention", "patch_sdpa", "unpatch_sdpa", "sdpa_patched", "varlen_attention",
                "attention_with_kvcache"]

# The torch front end's names, where torch is not installed: reaching one says what to install.
_NEEDS_TORCH = {"scaled_dot_product_attention", "patch_sdpa", "unpatch_sdpa", "sdpa_patched", "varlen_attention",
                "attention_with_kvcache", "ops", "sdpa", "varlen"}


def __getattr__(name):
    if name == "distributed":  # imported on first use: torch.distributed costs time at import
        import importlib

        try:
            return importlib.import_module(".distributed", __name__)
        except ImportError as error:
            if "torch" not in str(error):
                raise
    if name in _NEEDS_TORCH or name == "distributed":
        raise ImportError(f"flashjit.{name} needs torch, which is not installed: pip install torch "
                          f"(flashjit.attention takes numpy arrays without it)")
    raise AttributeError(f"module 'flashjit' has no attribute {name!r}")
