"""Loupe's assistant: the model, processing, generation with confidence, results and the CLI."""
