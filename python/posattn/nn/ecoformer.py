"""nn modules for ecoformer."""
__all__: list = []
