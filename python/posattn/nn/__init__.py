"""torch.nn modules built on posattn's ops."""
from .ecoformer import *  # noqa: F401,F403
from .kernelized_rpe import *  # noqa: F401,F403
