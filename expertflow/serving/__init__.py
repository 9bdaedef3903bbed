"""Serving a loaded model to many clients: the engine (continuous batching, admission by experts) and the
OpenAI-compatible HTTP API of ``expertflow serve-model``."""
