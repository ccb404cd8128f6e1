"""Loupe data_builders package."""
