"""PyTorch CPU reference timings for the shapes in benches/conv.rs.

Run with 2 threads on the same machine and in the same session as `cargo bench --bench conv`
so that the ratios mean something:  python benches/pytorch/conv_bench.py
(TORCH_THREADS overrides the thread count; on a loaded machine OMP_WAIT_POLICY=PASSIVE
keeps OpenMP from losing whole scheduler ticks at its barriers.)
Prints median ms and GFLOP/s for forward (no grad) and forward+backward (loss = sum, grads to
both x and w), matching the Rust bench's definitions. An argument restricts it to the shapes
whose name contains it.
"""
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

SHAPES = [  # name, n, c, h, w, o, k, stride, pad
    ("16x64x32x32_o64_k3", 16, 64, 32, 32, 64, 3, 1, 1),
    ("64x32x32x32_o32_k3", 64, 32, 32, 32, 32, 3, 1, 1),
    ("64x64x16x16_o64_k3", 64, 64, 16, 16, 64, 3, 1, 1),
    ("64x32x32x32_o32_k3s2", 64, 32, 32, 32, 32, 3, 2, 1),
    ("64x64x16x16_o32_k1", 64, 64, 16, 16, 32, 1, 1, 0),
]


def median_ms(fn, reps=15):
    fn()
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def main():
    torch.set_num_threads(int(os.environ.get("TORCH_THREADS", "2")))
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"mkldnn {torch.backends.mkldnn.is_available()}")
    print(f"{'shape':<22} {'pass':>8} {'torch ms':>9} {'GFLOP/s':>8}")
    only = sys.argv[1] if len(sys.argv) > 1 else ""
    for name, n, c, h, w, o, k, s, p in (sh for sh in SHAPES if only in sh[0]):
        x = torch.randn(n, c, h, w, requires_grad=True)
        wt = (0.05 * torch.randn(o, c, k, k)).requires_grad_()
        ho, wo = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
        flops = 2.0 * n * o * ho * wo * c * k * k

        def fwd():
            with torch.no_grad():
                F.conv2d(x, wt, stride=s, padding=p)

        def fwd_bwd():
            x.grad = None
            wt.grad = None
            F.conv2d(x, wt, stride=s, padding=p).sum().backward()

        for label, fn, fl in (("fwd", fwd, flops), ("fwd+bwd", fwd_bwd, 3 * flops)):
            ms = median_ms(fn)
            print(f"{name:<22} {label:>8} {ms:>9.2f} {fl / ms / 1e6:>8.1f}")


if __name__ == "__main__":
    main()
