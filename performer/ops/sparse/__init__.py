from .api import block_sparse_linear, block_sparse_linear_int8  # noqa: F401
from .reference import BlockSparse, pack_blocks, pack_int8, unpack_blocks, unpack_int8  # noqa: F401
