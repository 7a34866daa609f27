from .api import block_sparse_linear  # noqa: F401
from .reference import BlockSparse, pack_blocks, unpack_blocks  # noqa: F401
