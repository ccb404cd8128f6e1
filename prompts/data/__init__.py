"""Prompt data files (YAML) of the labellers; shipped with the package."""
