"""Compiler passes: capture, canonicalize, analyse and rewrite a model, one pass per file."""
