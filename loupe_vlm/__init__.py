"""Loupe: explainable image analysis (quality, comparison, forgery) with a LoRA-tuned VLM.

Everything Loupe installs lives under this one root package, so nothing generic lands at the top
level of site-packages: ``loupe_vlm.prompts``, ``loupe_vlm.assistant``, ``loupe_vlm.data_builders``,
``loupe_vlm.finetune`` and ``loupe_vlm.demo`` (the repository's top-level folders, mapped here by
``package-dir`` in pyproject.toml), plus ``loupe_vlm.cli``, the ``loupe`` command's dispatcher.

The root is named after the distribution (``loupe-vlm``): a distribution named ``loupe`` already
exists on the package registry, and so do ones named like each of the folders.
"""

__version__ = "0.1.0"
