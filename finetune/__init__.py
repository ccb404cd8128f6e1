"""Loupe finetune package."""
