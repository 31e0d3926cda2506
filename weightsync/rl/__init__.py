"""RL pieces the example trainers share (pure torch; no Ray, no vLLM)."""
