"""Train large, then compress: a small transformer built from performer's modules (FAVOR+ attention,
BlockedLinear projections) learns a synthetic task; it is then pruned gradually to 90% of its weight
blocks (LAMP scores ranked across layers; six rounds on the cubic schedule of Zhu & Gupta 2017, a
fine-tune after each, and a last one), stored block-sparse (performer.compress) and quantized to
int8. Loss, agreement, stored weight bytes and time per batch are reported at each stage, beside a
dense model of the compressed size trained for as many steps.

The task: distill a fixed random "teacher" transformer (width 64): for sequences of random tokens,
match its output distribution at every position (loss: KL divergence to the teacher; agreement:
how often the top token matches). Run from the repository root:

    python examples/compress_model.py            # ~6 min on one core
    python examples/compress_model.py --quick    # half the steps (~3 min), for the tests
"""
from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F
from torch import nn

import performer
from performer.nn import BlockedLinear, FastAttention

VOCAB, LENGTH, HEADS, FEATURES = 64, 8, 4, 32


class Block(nn.Module):
    def __init__(self, dim: int, generator: torch.Generator):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.out = BlockedLinear(dim, 3 * dim), BlockedLinear(dim, dim)
        self.attention = FastAttention(dim // HEADS, FEATURES, generator=generator)
        self.up, self.down = BlockedLinear(dim, 4 * dim), BlockedLinear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, L, 3, HEADS, D // HEADS).permute(2, 0, 3, 1, 4)
        x = x + self.out(self.attention(q, k, v).transpose(1, 2).reshape(B, L, D))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class Model(nn.Module):
    def __init__(self, dim: int, layers: int = 2, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.embed = nn.Embedding(VOCAB, dim)
        self.position = nn.Parameter(0.1 * torch.randn(LENGTH, dim, generator=generator))
        self.blocks = nn.Sequential(*(Block(dim, generator) for _ in range(layers)))
        self.head = BlockedLinear(dim, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.embed(tokens) + self.position))


class Teacher:
    """A random Model(64) whose softmax(4 x logits) are the targets."""

    def __init__(self):
        torch.manual_seed(7)
        self.model = Model(64, seed=7).eval().requires_grad_(False)

    @torch.no_grad()
    def batch(self, size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = torch.randint(VOCAB, (size, LENGTH), generator=generator)
        return tokens, F.softmax(4 * self.model(tokens), dim=-1)


def kl_loss(model: nn.Module, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logp = F.log_softmax(model(tokens), dim=-1)
    return F.kl_div(logp.flatten(0, 1), targets.flatten(0, 1), reduction="batchmean")


def train(model: nn.Module, teacher: Teacher, steps: int, lr: float, generator: torch.Generator) -> None:
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    for _ in range(steps):
        loss = kl_loss(model, *teacher.batch(128, generator))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()


@torch.no_grad()
def evaluate(model: nn.Module, held_out) -> tuple[float, float]:
    """(KL divergence to the teacher, top-1 agreement) on the held-out batch."""
    tokens, targets = held_out
    model.eval()
    return kl_loss(model, tokens, targets).item(), (model(tokens).argmax(-1) == targets.argmax(-1)).float().mean().item()


def stored_bytes(model: nn.Module) -> int:
    """The bytes of every weight the model stores (kept blocks only for compressed layers)."""
    return sum(b.numel() * b.element_size() for name, b in model.state_dict().items()
               if not name.endswith(("block_cols", "row_ptr", "format_version", "weight_mask", "features")))


@torch.no_grad()
def ms_per_batch(model: nn.Module, tokens: torch.Tensor) -> float:
    model.eval()(tokens)
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < 0.5:
        model(tokens)
        n += 1
    return 1e3 * (time.perf_counter() - start) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--large", type=int, default=128, help="the large model's width")
    parser.add_argument("--small", type=int, default=44,
                        help="the small dense model's width (44: the stored size of the large one at 90%%)")
    parser.add_argument("--steps", type=int, default=600, help="training steps of the large model")
    parser.add_argument("--rounds", type=int, default=6, help="pruning rounds")
    parser.add_argument("--finetune-steps", type=int, default=100, help="fine-tuning steps after each pruning round")
    parser.add_argument("--final-steps", type=int, default=300, help="fine-tuning steps after the last round")
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--quick", action="store_true", help="half the steps (for the tests)")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.finetune_steps, args.final_steps = 300, 50, 150

    torch.set_num_threads(1)
    teacher = Teacher()
    data = torch.Generator().manual_seed(1)
    held_out = teacher.batch(1024, torch.Generator().manual_seed(2))
    timing_tokens = held_out[0][:256]
    rows = []

    def report(name: str, model: nn.Module) -> None:
        kl, agreement = evaluate(model, held_out)
        rows.append((name, kl, agreement, stored_bytes(model), ms_per_batch(model, timing_tokens)))
        print(f"{name:<34} KL {kl:.4f}  agreement {agreement:.3f}  weights {rows[-1][3] / 1e3:7.1f} kB  "
              f"{rows[-1][4]:6.2f} ms per batch of 256", flush=True)

    start = time.perf_counter()
    torch.manual_seed(0)
    large = Model(args.large)
    train(large, teacher, args.steps, 3e-3, data)
    report(f"large (width {args.large}), dense", large)
    # Gradual pruning: round r of n prunes to sparsity s (1 - (1 - r / n)^3) (large steps first, small
    # ones near the end), each followed by a fine-tune; the masks keep pruned blocks at 0.
    for r in range(1, args.rounds + 1):
        performer.prune(large, args.sparsity * (1 - (1 - r / args.rounds) ** 3), block=(16, 16), scope="lamp")
        train(large, teacher, args.finetune_steps, 3e-3, data)
    train(large, teacher, args.final_steps, 3e-3, data)
    report(f"large, {args.sparsity:.0%} pruned (masked)", large)
    large = performer.compress(large)
    report("large, block-sparse (CompressedLinear)", large)
    int8 = performer.compress(copy.deepcopy(large), quantize="int8")   # the kept blocks in int8
    report("large, block-sparse int8 (Int8Linear)", int8)

    torch.manual_seed(0)
    small = Model(args.small)
    train(small, teacher, args.steps + args.rounds * args.finetune_steps + args.final_steps, 3e-3, data)
    report(f"small (width {args.small}), dense", small)

    print("\n| model | KL to teacher | top-1 agreement | weights (kB) | ms per batch of 256 |\n| --- | ---: | ---: | ---: | ---: |")
    for name, kl, agreement, size, ms in rows:
        print(f"| {name} | {kl:.4f} | {agreement:.3f} | {size / 1e3:.1f} | {ms:.2f} |")
    print(f"\n({time.perf_counter() - start:.0f} s, 1 thread)")


if __name__ == "__main__":
    main()
