"""Loupe demo package."""
