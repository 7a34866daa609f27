"""Train a small transformer with exact attention, convert it to FAVOR+ with performer.convert,
calibrate it (performer.calibrate: FAVOR++ features fitted to the exact attention, the model's
weights untouched) and fine-tune it briefly: the loss jumps at the conversion (the random features
only approximate softmax attention), calibration brings most of it back without changing a weight,
and fine-tuning the rest.

The task: reverse a sequence of random tokens, which needs every position to attend to its mirror
position. Run from the repository root:

    python examples/convert_and_finetune.py            # ~40 s on one core
    python examples/convert_and_finetune.py --quick    # fewer steps (~15 s), for the tests
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

import performer

VOCAB, LENGTH, DIM, HEADS = 16, 16, 64, 4


class Reverser(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.position = nn.Parameter(0.1 * torch.randn(LENGTH, DIM))
        layer = nn.TransformerEncoderLayer(DIM, HEADS, dim_feedforward=2 * DIM, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(DIM, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(tokens) + self.position))


def batch(size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(VOCAB, (size, LENGTH), generator=generator)
    return tokens, tokens.flip(1)


def loss_on(model: nn.Module, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(tokens).flatten(0, 1), targets.flatten())


def train(model: nn.Module, steps: int, lr: float, generator: torch.Generator) -> None:
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    for _ in range(steps):
        loss = loss_on(model, *batch(64, generator))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()


@torch.no_grad()
def evaluate(model: nn.Module, held_out) -> float:
    return loss_on(model.eval(), *held_out).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=500, help="training steps with exact attention")
    parser.add_argument("--calibrate-steps", type=int, default=500, help="calibration steps after the conversion "
                        "(0: none)")
    parser.add_argument("--finetune-steps", type=int, default=300, help="fine-tuning steps after the calibration")
    parser.add_argument("--num-features", type=int, default=64, help="random features per head")
    parser.add_argument("--kernel", default="softmax", choices=("softmax", "softmax_normalized"),
                        help="favor_attention's kernel (softmax_normalized: each key's features divided by their sum)")
    parser.add_argument("--quick", action="store_true", help="300 + 100 + 100 steps (for the tests)")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.calibrate_steps, args.finetune_steps = 300, 100, 100

    # A model this small runs fastest on one thread (more threads only wait on each other).
    torch.set_num_threads(1)
    torch.manual_seed(0)
    data = torch.Generator().manual_seed(1)
    held_out = batch(512, torch.Generator().manual_seed(2))
    model = Reverser()
    start = time.perf_counter()

    train(model, args.steps, 3e-3, data)
    print(f"loss before conversion:      {evaluate(model, held_out):.4f}  (exact attention, {args.steps} steps)")
    performer.convert(model, num_features=args.num_features, kernel=args.kernel,
                      generator=torch.Generator().manual_seed(3))
    print(f"loss right after conversion: {evaluate(model, held_out):.4f}  (FAVOR+, {args.num_features} features, "
          f"kernel {args.kernel})")
    if args.calibrate_steps:
        # Calibration data: inputs only (no labels), the model's own training distribution.
        calibration = [batch(64, data)[0] for _ in range(20)]
        performer.calibrate(model, calibration, steps=args.calibrate_steps)
        print(f"loss after calibration:      {evaluate(model, held_out):.4f}  ({args.calibrate_steps} steps, "
              "weights untouched)")
    train(model, args.finetune_steps, 1e-3, data)
    print(f"loss after fine-tuning:      {evaluate(model, held_out):.4f}  ({args.finetune_steps} steps)")
    print(f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
