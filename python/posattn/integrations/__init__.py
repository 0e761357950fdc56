"""Integrations with other libraries (HF transformers, sentence-transformers)."""
