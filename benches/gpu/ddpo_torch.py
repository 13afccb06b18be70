"""The PyTorch twin of `ddpo train`'s epoch in benches/gpu/check.sh: one DDPO epoch as the
reference implementation (kvablack/ddpo-pytorch) runs it, on the same diffusers folder and the
same weights, so the two are timed side by side on one GPU.

What it does, as the reference: guided DDIM sampling with eta 1 that records each step's
log-prob (`pipeline_with_logprob`, `ddim_step_with_logprob`), the VAE decode, a reward, advantages
normalised over the batch, then per sample (train batch 1) and per timestep the clipped
importance-sampling loss, gradients accumulated over the timesteps, clipped to norm 1, one AdamW
step per train batch. LoRA adapters (peft) on to_q, to_k, to_v, to_out.0; frozen weights in fp16
with autocast and a grad scaler (accelerate's fp16 mixed precision) on CUDA, all f32 on the CPU.
The reward is `ddpo`'s built-in `brightness` (mean pixel value in 0..1): cheap, so the times are
the model's.

The weights are loaded strictly: every UNet and text-encoder tensor `ddpo bench --random-weights`
wrote must be one diffusers / transformers expects, and the VAE may lack only its encoder.

    python3 ddpo_torch.py --model-dir DIR [--device cuda] [--samples 8] [--sample-batch-size 8]
        [--train-batch-size 1] [--steps 50] [--lora-rank 4]
Prints one JSON object: seconds per phase and peak GPU memory.
"""

import argparse
import json
import math
import os
import time

import torch
from safetensors.torch import load_file


def load_pipeline(model_dir, device, dtype):
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    def strict(model, file, may_miss=()):
        missing, unexpected = model.load_state_dict(load_file(os.path.join(model_dir, file)), strict=False)
        missing = [k for k in missing if not k.startswith(may_miss)]  # startswith(()) is False
        assert not missing and not unexpected, f"{file}: missing {missing[:3]}, unexpected {unexpected[:3]}"
        return model

    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(os.path.join(model_dir, "unet")))
    strict(unet, "unet/diffusion_pytorch_model.safetensors")
    # transformers renames the file's `text_model.*` keys itself in some versions: its loader
    # reports what it could not place.
    text, info = CLIPTextModel.from_pretrained(os.path.join(model_dir, "text_encoder"), output_loading_info=True)
    unplaced = [k for k in [*info["missing_keys"], *info["unexpected_keys"]] if not k.endswith("position_ids")]
    assert not unplaced, f"text_encoder/model.safetensors: keys transformers cannot place: {unplaced[:3]}"
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(os.path.join(model_dir, "vae")))
    strict(vae, "vae/diffusion_pytorch_model.safetensors", may_miss=("encoder.", "quant_conv."))
    tokenizer = CLIPTokenizer.from_pretrained(os.path.join(model_dir, "tokenizer"))
    scheduler = DDIMScheduler.from_config(DDIMScheduler.load_config(os.path.join(model_dir, "scheduler")))
    for m in (unet, text, vae):
        m.requires_grad_(False)
        m.to(device, dtype=dtype)
    return unet, text, vae, tokenizer, scheduler


def ddim_step_with_logprob(scheduler, eps, t, sample, eta, prev_sample=None):
    """The reference's DDIM step: the previous sample (drawn unless given) and its log-prob,
    the mean over all but the batch dimension."""
    prev_t = torch.clamp(t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps, 0, None)
    acp = scheduler.alphas_cumprod.to(sample.device)
    a_t, a_prev = acp[t].view(-1, 1, 1, 1), acp[prev_t].view(-1, 1, 1, 1)
    b_t, b_prev = 1 - a_t, 1 - a_prev
    x0 = (sample - b_t.sqrt() * eps) / a_t.sqrt()
    std = eta * ((b_prev / b_t) * (1 - a_t / a_prev)).sqrt()
    mean = a_prev.sqrt() * x0 + (1 - a_prev - std**2).sqrt() * eps
    if prev_sample is None:
        prev_sample = mean + std * torch.randn_like(sample)
    log_prob = -((prev_sample.detach() - mean) ** 2) / (2 * std**2) - torch.log(std) - math.log(math.sqrt(2 * math.pi))
    return prev_sample, log_prob.mean(dim=tuple(range(1, log_prob.ndim)))


def guided_eps(unet, latents, t, embeds, guidance):
    out = unet(torch.cat([latents] * 2), t, encoder_hidden_states=embeds).sample
    uncond, cond = out.chunk(2)
    return uncond + guidance * (cond - uncond)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model-dir", required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--sample-batch-size", type=int, default=8)
    p.add_argument("--train-batch-size", type=int, default=1)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--lora-rank", type=int, default=4)
    p.add_argument("--prompt", default="a photo of a cat")
    a = p.parse_args()
    from peft import LoraConfig

    device = torch.device(a.device)
    cuda = device.type == "cuda"
    dtype = torch.float16 if cuda else torch.float32
    torch.manual_seed(0)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True  # as the reference
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    unet, text, vae, tokenizer, scheduler = load_pipeline(a.model_dir, device, dtype)
    unet.add_adapter(LoraConfig(r=a.lora_rank, lora_alpha=a.lora_rank, init_lora_weights="gaussian", target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    params = [q for q in unet.parameters() if q.requires_grad]
    for q in params:
        q.data = q.data.float()  # adapters train in f32, as the reference's
    optimizer = torch.optim.AdamW(params, lr=3e-4, betas=(0.9, 0.999), weight_decay=1e-4, eps=1e-8)
    scaler = torch.amp.GradScaler(enabled=cuda)
    scheduler.set_timesteps(a.steps, device=device)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    seconds_load = time.perf_counter() - start

    def embed(texts):
        ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
        return text(ids.to(device))[0]

    # Sampling: trajectories and their log-probs, then the reward.
    start = time.perf_counter()
    samples = []
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=cuda):
        for b in range(0, a.samples, a.sample_batch_size):
            n = min(a.sample_batch_size, a.samples - b)
            embeds = torch.cat([embed([""] * n), embed([a.prompt] * n)])
            size = unet.config.sample_size
            latents = torch.randn(n, unet.config.in_channels, size, size, device=device, dtype=dtype)
            traj, log_probs = [latents], []
            for t in scheduler.timesteps:
                eps = guided_eps(unet, latents, t, embeds, 5.0)
                latents, lp = ddim_step_with_logprob(scheduler, eps.float(), t.repeat(n), latents.float(), 1.0)
                latents = latents.to(dtype)
                traj.append(latents)
                log_probs.append(lp)
            images = vae.decode(latents / vae.config.scaling_factor).sample
            reward = ((images.float() + 1) / 2).clamp(0, 1).mean(dim=(1, 2, 3))
            samples.append((embeds, torch.stack(traj, 1), torch.stack(log_probs, 1), reward))
    sync()
    seconds_sampling = time.perf_counter() - start

    # Training: the clipped importance-sampling loss per sample and timestep.
    start = time.perf_counter()
    rewards = torch.cat([s[3] for s in samples])
    advantages = ((rewards - rewards.mean()) / (rewards.std(unbiased=False) + 1e-8)).clamp(-5, 5)
    index = 0
    for embeds, traj, old_log_probs, _ in samples:
        n = traj.shape[0]
        for i in range(0, n, a.train_batch_size):
            m = min(a.train_batch_size, n - i)
            rows = torch.cat([torch.arange(i, i + m), torch.arange(n + i, n + i + m)]).to(device)
            adv = advantages[index + i : index + i + m]
            for j, t in enumerate(scheduler.timesteps):
                with torch.autocast(device.type, dtype=dtype, enabled=cuda):
                    eps = guided_eps(unet, traj[i : i + m, j], t, embeds[rows], 5.0)
                _, lp = ddim_step_with_logprob(scheduler, eps.float(), t.repeat(m), traj[i : i + m, j].float(), 1.0, traj[i : i + m, j + 1].float())
                ratio = torch.exp(lp - old_log_probs[i : i + m, j])
                loss = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - 1e-4, 1 + 1e-4)).mean()
                scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad()
        index += n
    sync()
    seconds_training = time.perf_counter() - start
    report = {
        "seconds_load": round(seconds_load, 2),
        "seconds_sampling": round(seconds_sampling, 2),
        "seconds_training": round(seconds_training, 2),
        "reward_mean": rewards.mean().item(),
        "peak_memory_mib": round(torch.cuda.max_memory_reserved() / 2**20) if cuda else None,
        "torch": torch.__version__,
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
