from .api import blocked_matmul  # noqa: F401
