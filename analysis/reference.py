"""The published numbers this study is compared with, in one place, each with what it measured."""

from __future__ import annotations

REFERENCES = (
    {
        "source": "paper (Dinh et al. 2017, Table 1)",
        "bits/dim": 3.49,
        "spread": None,
        "measured": "CIFAR-10 test set, 50,000 training images, paper model, 'bits/dim' as the paper defines it",
    },
    {
        "source": "seed report (KTH ID2223)",
        "bits/dim": 3.47,
        "spread": 0.137,
        "measured": "validation bits/dim, mean and std over the last 40 of 100 epochs of one run (one seed); "
        "split, batch-norm mode and formula not stated",
    },
    {
        "source": "chrischute/real-nvp README",
        "bits/dim": 3.70,
        "spread": None,
        "measured": "best validation bits/dim (around epoch 20) of one run",
    },
)
