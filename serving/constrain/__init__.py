"""Constrained decoding: masks that keep a request's output inside a language (JSON for json_object mode)."""
