"""Time one decoding step after prefixes of growing length: favor_attention_step carries a state
of fixed size, so its cost stays flat, while exact attention over a key/value cache grows with
the prefix. Run from the repository root: python examples/decode_cost.py
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import performer


def per_call_ms(fn, repeats: int) -> float:
    fn()  # warm up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return 1e3 * (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--num-features", type=int, default=256)
    parser.add_argument("--prefixes", type=int, nargs="+", default=[256, 1024, 4096, 16384])
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(1)

    g = torch.Generator().manual_seed(0)
    shape = (args.batch, args.heads)
    features = performer.orthogonal_features(args.num_features, args.head_dim, generator=g)
    token = [torch.randn(*shape, 1, args.head_dim, generator=g) for _ in range(3)]
    print(f"one token, {args.batch} x {args.heads} heads x {args.head_dim}, m = {args.num_features}; ms per step")
    print(f"{'prefix':>8} {'favor_attention_step':>21} {'exact, KV cache':>16}")
    for prefix in args.prefixes:
        keys, values = (torch.randn(*shape, prefix, args.head_dim, generator=g) for _ in range(2))
        queries = torch.randn(*shape, prefix, args.head_dim, generator=g)
        _, state = performer.favor_attention_step(queries, keys, values, features=features)  # the prompt
        favor = per_call_ms(lambda: performer.favor_attention_step(*token, state, features=features), args.repeats)
        k_all, v_all = torch.cat([keys, token[1]], -2), torch.cat([values, token[2]], -2)
        exact = per_call_ms(lambda: F.scaled_dot_product_attention(token[0], k_all, v_all), args.repeats)
        print(f"{prefix:>8} {favor:>21.3f} {exact:>16.3f}")


if __name__ == "__main__":
    main()
