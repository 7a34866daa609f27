from .api import favor_attention  # noqa: F401
