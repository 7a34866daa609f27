from .api import favor_attention  # noqa: F401
from .step import FavorState, favor_attention_step  # noqa: F401
