"""Inference engines: the embedded engine, the SGLang-compatible server and client, the SGLang launcher."""
