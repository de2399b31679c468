"""effx: efficient-LLM inference primitives as PyTorch operators.

Importing effx loads the compiled extension ``effx._C``, which registers every operator
under ``torch.ops.effx``; ``effx.ops`` holds typed Python wrappers.
"""

import torch

from effx._version import __version__

try:
    from effx import _C
except ImportError as err:  # pragma: no cover - only when the build is broken or mismatched
    raise ImportError(
        "effx: cannot load the compiled extension effx._C "
        f"(torch {torch.__version__} is installed): {err}. Rebuild effx against this torch "
        "with `pip install --no-build-isolation .`."
    ) from err

_built_with = _C.build_info()["torch_version"]
if _built_with.split("+")[0] != torch.__version__.split("+")[0]:
    raise ImportError(
        f"effx: this build of effx was compiled against torch {_built_with}, but torch "
        f"{torch.__version__} is installed; torch's C++ ABI differs between releases. Rebuild "
        "effx with `pip install --no-build-isolation .`."
    )

from effx import _meta, ops  # noqa: E402  (registers fake kernels; typed wrappers)
from effx import kv, monarch, nn, sparse  # noqa: E402  (the method families)

__all__ = ["__version__", "ops", "kv", "monarch", "nn", "sparse", "build_info"]


def build_info() -> dict:
    """What this build of effx was compiled with (version, torch, CUDA archs, OpenMP)."""
    return dict(_C.build_info())
