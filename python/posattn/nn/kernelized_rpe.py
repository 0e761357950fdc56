"""nn modules for kernelized_rpe."""
__all__: list = []
