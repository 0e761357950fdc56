"""rotary op: public function(s), checks, dispatch, autograd."""
__all__: list = []
