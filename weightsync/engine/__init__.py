"""Engine side: vLLM compat layer, the in-worker extension, the engine host, its Ray actor."""
