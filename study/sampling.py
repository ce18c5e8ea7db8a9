"""Sample grids from a model (the seed report's Figure 2)."""

from __future__ import annotations

from pathlib import Path

import torch

SAMPLE_SEED = 1234  # the same latents every time, so grids across epochs are comparable
TEMPERATURES = (1.0, 0.7)


def sample_grid(model, n: int = 64, temperature: float = 1.0, seed: int = SAMPLE_SEED) -> torch.Tensor:
    """(3, H', W') image grid of n samples, nrow = sqrt(n), values in [0, 1] (torchvision make_grid)."""
    from torchvision.utils import make_grid

    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    samples = model.sample(n, temperature=temperature, generator=gen).float().cpu()
    return make_grid(samples, nrow=max(1, int(n**0.5)), padding=2, pad_value=1.0)


def save_grid(grid: torch.Tensor, path: Path) -> Path:
    from torchvision.utils import save_image

    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(grid, str(path))
    return path
