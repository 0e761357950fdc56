"""posattn: attention kernels with positional encodings fused in.

The public API, nothing else. See README.md for the feature table.
"""
__version__ = "0.1.0"

from .positional import RoPE, ALiBi, RelativeBias, T5Bias, XPos, URPE, LearnedPhaseRoPE  # noqa: F401
from .ops.attention import *  # noqa: F401,F403
from .ops.rotary import *  # noqa: F401,F403
from .ops.varlen import *  # noqa: F401,F403
from .ops.decode import *  # noqa: F401,F403
from .ops.kernelized_rpe import *  # noqa: F401,F403
from .ops.ecoformer import *  # noqa: F401,F403
from . import nn  # noqa: F401
