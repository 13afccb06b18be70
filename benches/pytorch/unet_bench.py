"""PyTorch (diffusers + transformers) reference for `ddpo bench`: the same workloads on the same
default configuration, printing a JSON object with the same keys.

Run it on the same machine and in the same minutes as `ddpo bench`, so the ratios mean something:

    OMP_WAIT_POLICY=PASSIVE python benches/pytorch/unet_bench.py [--repeats 5] [--only unet_fwd]

It uses 2 threads (TORCH_THREADS overrides). On a loaded or small VM, OpenMP's default spinning
barriers give pathological times, hence OMP_WAIT_POLICY=PASSIVE (set here too, before torch is
imported, unless the environment already sets it). Needs `pip install torch diffusers transformers`.
Not part of CI. The DDPO epoch (sampling + JPEG reward + PPO update) has no PyTorch twin here.

The models are built by hand from `ddpo bench --print-config` (`PolicyConfig::shapes_default()`):
a 16/32/64-channel UNet with cross-attention at 8x8 and a 2-layer, 64-wide CLIP text encoder.
"""
import argparse
import json
import os
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from diffusers import UNet2DConditionModel  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel  # noqa: E402

WORKLOADS = ["conv", "group_norm", "attention", "unet_fwd", "train_step", "ddim"]
TOKENS, VOCAB = 16, 40


def unet():
    """`UNetConfig::shapes_default()` as diffusers kwargs (attention_head_dim = heads, as ours)."""
    return UNet2DConditionModel(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32, 64),
        down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        attention_head_dim=4,
        cross_attention_dim=64,
        norm_num_groups=8,
        norm_eps=1e-5,
        flip_sin_to_cos=True,
        freq_shift=0,
        downsample_padding=1,
    )


def text_encoder():
    """`TextConfig::shapes_default(40, 16)` as a transformers CLIPTextModel."""
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=TOKENS, hidden_act="quick_gelu",
        layer_norm_eps=1e-5))


def peak_rss_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def measure(args, shape, flops, fn):
    for _ in range(args.warmup):
        fn()
    times = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    med = statistics.median_high(times)  # the same element as the Rust harness picks
    out = {"shape": shape, "repeats": args.repeats, "median_ms": med, "min_ms": min(times),
           "max_ms": max(times), "peak_rss_mb": peak_rss_mb()}
    if flops:
        out["gflops"] = flops / (med * 1e6)
    return out


def counted_flops(fn):
    """Matmul and convolution FLOPs of one call, as torch's FlopCounterMode counts them."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def conv(args, backward):
    n, c, h, w, o = 16, 64, 32, 32, 64
    x = torch.randn(n, c, h, w, requires_grad=True)
    wt = (0.05 * torch.randn(o, c, 3, 3)).requires_grad_()
    b = (0.05 * torch.randn(o)).requires_grad_()
    flops = 2.0 * n * o * h * w * c * 9 * (3 if backward else 1)

    def run():
        if backward:
            F.conv2d(x, wt, b, 1, 1).sum().backward()
        else:
            with torch.no_grad():
                F.conv2d(x, wt, b, 1, 1)
    return measure(args, f"x {n}x{c}x{h}x{w}, {o} out, 3x3 pad 1, bias", flops, run)


def group_norm(args):
    n, c, h, w, groups = 64, 32, 32, 32, 8
    x = torch.randn(n, c, h, w, requires_grad=True)
    wt = (1 + 0.1 * torch.randn(c)).requires_grad_()
    b = (0.1 * torch.randn(c)).requires_grad_()
    run = lambda: F.silu(F.group_norm(x, groups, wt, b, 1e-5)).sum().backward()  # noqa: E731
    return measure(args, f"x {n}x{c}x{h}x{w}, {groups} groups, + SiLU", None, run)


def attention_fwd_flops(b, l, c, s, d):
    mm = lambda m, k, n: 2.0 * b * m * k * n  # noqa: E731
    return (2 * mm(l, c, c) + 4 * mm(l, c, c) + 2 * mm(l, c, l) + 2 * mm(l, c, c) + 2 * mm(s, d, c)
            + 2 * mm(l, c, s) + mm(l, c, 8 * c) + mm(l, 4 * c, c))


def attention(args):
    b, c, side, s, d = 64, 64, 8, 16, 64
    block = unet().down_blocks[2].attentions[0]
    x = torch.randn(b, c, side, side, requires_grad=True)
    ctx = torch.randn(b, s, d)
    run = lambda: block(x, encoder_hidden_states=ctx).sample.sum().backward()  # noqa: E731
    return measure(args, f"x {b}x{c}x{side}x{side}, 4 heads, context {b}x{s}x{d}",
                   3 * attention_fwd_flops(b, side * side, c, s, d), run)


def unet_fwd(args):
    n = 32
    model, text = unet(), text_encoder()
    x, t = torch.randn(n, 3, 32, 32), torch.full((n,), 500.0)
    with torch.no_grad():
        ctx = text(torch.randint(0, VOCAB, (n, TOKENS))).last_hidden_state

    def run():
        with torch.no_grad():
            model(x, t, encoder_hidden_states=ctx)
    return measure(args, f"batch {n}, 32x32", counted_flops(run), run)


def train_step(args):
    n = 64
    model, text = unet(), text_encoder()
    opt = torch.optim.AdamW(list(model.parameters()) + list(text.parameters()), lr=3e-4,
                            weight_decay=1e-4)
    x, t, target = torch.randn(n, 3, 32, 32), torch.full((n,), 500.0), torch.randn(n, 3, 32, 32)
    ids = torch.randint(0, VOCAB, (n, TOKENS))

    def run():
        opt.zero_grad(set_to_none=True)
        ctx = text(ids).last_hidden_state
        loss = (model(x, t, encoder_hidden_states=ctx).sample - target).square().mean()
        loss.backward()
        opt.step()
    return measure(args, f"batch {n}, text encoder + UNet, AdamW", None, run)


def ddim(args):
    n, steps, guidance, eta = 64, 20, 5.0, 1.0
    model, text = unet(), text_encoder()
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    alpha_bar = torch.cumprod(1 - betas, 0)
    ratio = 1000 // steps
    timesteps = [i * ratio + 1 for i in reversed(range(steps))]
    cond_ids, uncond_ids = torch.randint(0, VOCAB, (n, TOKENS)), torch.zeros(n, TOKENS, dtype=torch.long)

    @torch.no_grad()
    def run():
        cond = text(cond_ids).last_hidden_state
        uncond = text(uncond_ids).last_hidden_state
        ctx = torch.cat([uncond, cond])
        x = torch.randn(n, 3, 32, 32)
        log_probs = []
        for t in timesteps:
            eps_u, eps_c = model(torch.cat([x, x]), torch.full((2 * n,), float(t)),
                                 encoder_hidden_states=ctx).sample.chunk(2)
            eps = eps_u + guidance * (eps_c - eps_u)
            ab_t, ab_prev = alpha_bar[t].item(), alpha_bar[max(t - ratio, 0)].item()
            sigma = eta * ((1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev)) ** 0.5
            x0 = (x - (1 - ab_t) ** 0.5 * eps) / ab_t ** 0.5
            mean = ab_prev ** 0.5 * x0 + max(1 - ab_prev - sigma ** 2, 0) ** 0.5 * eps
            x = mean + sigma * torch.randn_like(x)
            lp = -((x - mean) ** 2) / (2 * sigma ** 2) - torch.log(torch.tensor(sigma)) \
                - 0.5 * torch.log(torch.tensor(2 * torch.pi))
            log_probs.append(lp.flatten(1).mean(1))
        return x, torch.stack(log_probs, 1)
    return measure(args, f"{n} images, {steps} steps, guidance {guidance:g}, eta {eta:g}", None, run)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--only", choices=WORKLOADS)
    args = p.parse_args()
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    torch.set_num_threads(int(os.environ.get("TORCH_THREADS", "2")))
    torch.manual_seed(0)
    groups = {
        "conv": lambda: {"conv_fwd": conv(args, False), "conv_fwd_bwd": conv(args, True)},
        "group_norm": lambda: {"group_norm_silu_fwd_bwd": group_norm(args)},
        "attention": lambda: {"attention_fwd_bwd": attention(args)},
        "unet_fwd": lambda: {"unet_fwd": unet_fwd(args)},
        "train_step": lambda: {"train_step": train_step(args)},
        "ddim": lambda: {"ddim_sample": ddim(args)},
    }
    workloads = {}
    for name in [args.only] if args.only else WORKLOADS:
        workloads.update(groups[name]())
    print(json.dumps({
        "implementation": f"torch {torch.__version__} (diffusers, CPU f32, "
                          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')})",
        "threads": torch.get_num_threads(),
        "quick": False,
        "workloads": dict(sorted(workloads.items())),
        "peak_rss_mb": peak_rss_mb(),
    }, indent=2))


if __name__ == "__main__":
    main()
