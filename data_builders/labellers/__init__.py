"""Labellers: turn a sample's ground truth into answer text (``template`` offline, ``openai`` via an endpoint)."""
