"""Thread scaling of FAVOR+ (C++) with a single head, where the sequence is split across threads:
B = H = 1, L = 16384, E = 64, m = 256, float32; median of 5 runs at 1 and 2 threads.

    python bench/thread_scaling.py
"""
import time

import torch

import performer


def main():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, 16384, 64, generator=g).requires_grad_() for _ in range(3))
    w = performer.orthogonal_features(256, 64, generator=g)
    print("| mode | 1 thread | 2 threads |\n|---|---:|---:|")
    for causal in (False, True):
        res = {}
        for threads in (1, 2):
            torch.set_num_threads(threads)
            runs = []
            for _ in range(5):
                t = time.perf_counter()
                out = performer.favor_attention(q, k, v, is_causal=causal, features=w)
                fwd = time.perf_counter() - t
                out.sum().backward()
                runs.append((fwd, time.perf_counter() - t))
            runs.sort()
            res[threads] = runs[len(runs) // 2]
        name = "causal" if causal else "bidirectional"
        for i, mode in enumerate(("forward", "forward+backward")):
            print(f"| {name} {mode} | {res[1][i] * 1e3:.1f} ms | {res[2][i] * 1e3:.1f} ms |")


if __name__ == "__main__":
    main()
