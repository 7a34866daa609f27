"""Small calls of every CUDA kernel of the package, forward and backward, for compute-sanitizer
(scripts/gpu.sh, step `sanitize`: memcheck for out-of-bounds and uninitialized accesses, racecheck
for shared-memory races). Shapes cross the kernels' tile edges; prints one line per call.
`python scripts/sanitize_cuda.py cpu` makes the same calls on the CPU kernels."""
import torch

import performer


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()  # a kernel's fault shows at this call


def favor_calls(device):
    g = torch.Generator().manual_seed(0)
    # (B, H, Hk, L, E, Ev, m): odd sizes across the 64-row, 32-feature and 32/64-column tiles, GQA.
    for B, H, Hk, L, E, Ev, m in [(2, 4, 2, 70, 40, 70, 40), (1, 2, 2, 130, 64, 64, 256)]:
        for dtype in (torch.float32, torch.bfloat16):
            q = torch.randn(B, H, L, E, generator=g).to(device, dtype).requires_grad_()
            k = torch.randn(B, Hk, L, E, generator=g).to(device, dtype).requires_grad_()
            v = torch.randn(B, Hk, L, Ev, generator=g).to(device, dtype).requires_grad_()
            features = performer.orthogonal_features(m, E, generator=g).to(device)
            mask = (torch.rand(B, L, generator=g) < 0.25).to(device)
            for causal in (False, True):
                out = performer.favor_attention(q, k, v, is_causal=causal, features=features,
                                                key_padding_mask=mask, backend="cpp")
                out.float().square().sum().backward()
                sync(device)
                print(f"favor_attention {tuple(q.shape)} Hk={Hk} Ev={Ev} m={m} {dtype} causal={causal}: ok")


def step_calls(device):
    g = torch.Generator().manual_seed(2)
    # (B, H, Hk, T, E, Ev, m): features past the 256 threads, value columns past a warp, 9 heads per key head.
    for B, H, Hk, T, E, Ev, m in [(2, 4, 2, 3, 40, 70, 300), (1, 9, 1, 1, 64, 64, 256)]:
        for dtype in (torch.float32, torch.bfloat16):
            features = performer.orthogonal_features(m, E, generator=g).to(device)
            state = None
            for _ in range(2):  # from an empty state, then in place
                q = torch.randn(B, H, T, E, generator=g).to(device, dtype)
                k = torch.randn(B, Hk, T, E, generator=g).to(device, dtype)
                v = torch.randn(B, Hk, T, Ev, generator=g).to(device, dtype)
                _, state = performer.favor_attention_step(q, k, v, state, features=features, backend="cpp",
                                                          inplace=True)
                sync(device)
            print(f"favor_attention_step {tuple(q.shape)} Hk={Hk} Ev={Ev} m={m} {dtype}: ok")


def matmul_calls(device):
    g = torch.Generator().manual_seed(1)
    for M, N, K in [(33, 257, 7), (130, 70, 129)]:
        for dtype in (torch.float32, torch.bfloat16):
            a = torch.randn(M, K, generator=g).to(device, dtype).requires_grad_()
            b = torch.randn(K, N, generator=g).to(device, dtype).requires_grad_()
            performer.blocked_matmul(a, b, backend="cpp").float().sum().backward()
            sync(device)
            print(f"blocked_matmul {M}x{K} @ {K}x{N} {dtype}: ok")


if __name__ == "__main__":
    import sys
    device = sys.argv[1] if len(sys.argv) > 1 else "cuda"  # "cpu" runs the same calls on the CPU kernels
    favor_calls(device)
    step_calls(device)
    matmul_calls(device)
