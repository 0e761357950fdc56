"""One module per op: validation, dispatch and autograd glue (functional.py re-exports)."""
