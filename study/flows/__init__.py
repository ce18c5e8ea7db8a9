"""Real NVP and its pieces; see realnvp.py for the public contract. The package stands alone: it
takes FlowOptions and plain sizes, and imports nothing of the harness (study/model.py builds it from
a study Config)."""

from study.flows.options import FlowOptions
from study.flows.realnvp import RealNVP, forward_flops_per_image, num_parameters

__all__ = ["FlowOptions", "RealNVP", "forward_flops_per_image", "num_parameters"]
