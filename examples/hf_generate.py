"""Time per generated token of a GPT-2-shaped model (random weights, built from a config) as the
prompt grows: FAVOR+ with FavorCache (a fixed-size state per layer) against exact SDPA with
transformers' DynamicCache (keys and values kept). Run from the repository root:
python examples/hf_generate.py [--prompts 256 1024 4096]
"""
from __future__ import annotations

import argparse
import copy
import time

import torch
from transformers import DynamicCache, GPT2Config, GPT2LMHeadModel

import performer.integrations.hf as favor_hf


def ms_per_token(model, ids, cache, new_tokens: int) -> float:
    """Prefill the prompt, then time the next tokens one forward at a time (greedy)."""
    with torch.no_grad():
        out = model(ids, cache=cache)
        token = out.logits[:, -1:].argmax(-1)
        start = time.perf_counter()
        for _ in range(new_tokens):
            out = model(token, cache=cache)
            token = out.logits[:, -1:].argmax(-1)
    return 1e3 * (time.perf_counter() - start) / new_tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--num-features", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    favor_hf.register("favor", num_features=args.num_features)
    cfg = GPT2Config(vocab_size=1024, n_embd=512, n_layer=4, n_head=8, n_positions=max(args.prompts) + args.new_tokens,
                     bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    models = {name: GPT2LMHeadModel._from_config(copy.deepcopy(cfg), attn_implementation=name).eval()
              for name in ("favor", "sdpa")}
    models["favor"].load_state_dict(models["sdpa"].state_dict())
    print(f"GPT-2 shape: {cfg.n_layer} layers, {cfg.n_head} heads x {cfg.n_embd // cfg.n_head}, m = {args.num_features}, "
          f"float32, {args.threads} threads; ms per generated token")
    print(f"{'prompt':>8} {'FAVOR+ FavorCache':>18} {'SDPA DynamicCache':>18}")
    for n in args.prompts:
        ids = torch.randint(0, cfg.vocab_size, (1, n), generator=torch.Generator().manual_seed(n))
        favor = ms_per_token(models["favor"], ids, favor_hf.FavorCache(), args.new_tokens)
        exact = ms_per_token(models["sdpa"], ids, DynamicCache(), args.new_tokens)
        print(f"{n:>8} {favor:>18.2f} {exact:>18.2f}")


if __name__ == "__main__":
    main()
