"""Integrations with model libraries, imported on demand so that ``import performer`` needs neither:

- ``performer.integrations.hf``: FAVOR+ as a Hugging Face transformers attention implementation.
- ``performer.integrations.timm``: timm's attention modules swapped for FAVOR+ ones.
"""
