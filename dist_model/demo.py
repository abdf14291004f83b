"""Model smoke demo: `python -m dist_model.demo`.

Prints the trainable-parameter table of the presets (built on the meta device, no weights), then trains the tiny
preset for a few steps on random clips to show the whole model runs forward and backward with CLIP frozen.
"""

from __future__ import annotations

import time

import torch

from dist_model import DiSTConfig, DiSTNet, build_dist


def main() -> None:
    print(f"{'preset':<24} {'CLIP':<16} {'frames':>8} {'fusion layers':>13} {'pool':>4} {'trainable':>11}")
    for name in ("dist_b16_k400", "dist_b16_ssv2", "dist_b16_k400_32x64f", "dist_l14_k400", "dist_tiny"):
        cfg = DiSTConfig.from_name(name)
        with torch.device("meta"):
            count = sum(p.numel() for p in DiSTNet(cfg).parameters())
        frames = f"{cfg.sparse_frames}+{cfg.num_frames}"
        print(f"{name:<24} {cfg.clip_arch:<16} {frames:>8} {len(cfg.layers):>13} {cfg.pooling_layers:>4} "
              f"{count / 1e6:>9.2f} M")

    torch.manual_seed(0)
    model = build_dist("dist_tiny").train()
    classes = ["moving left", "moving right", "growing", "shrinking"]
    opt = torch.optim.AdamW(model.param_groups(weight_decay=1e-4), lr=1e-3)
    video = torch.randn(8, 3, model.cfg.num_frames, model.cfg.image_size, model.cfg.image_size)
    labels = torch.arange(8) % len(classes)
    start = time.perf_counter()
    for step in range(1, 21):
        loss = torch.nn.functional.cross_entropy(model(video, classes), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 5 == 0:
            print(f"step {step:>2}/20  loss {loss.item():.4f}")
    frozen = all(p.grad is None for p in model.clip.parameters())
    print(f"dist_tiny: {model.num_trainable_params():,} trainable parameters, CLIP frozen: {frozen}, "
          f"{20 / (time.perf_counter() - start):.1f} steps/s on CPU")


if __name__ == "__main__":
    main()
