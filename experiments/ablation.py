"""The ablation studies, declared once as data: a variant is a name, a one-line rationale and config
overrides applied on top of a preset. Seeds are shared across variants so comparisons pair up.

Base of the stabilizer study: chrischute/real-nvp, the code the seed report says it copied
(tanh-rescaled scale, batch norm inside s/t, weight norm with L2 5e-5 on its magnitudes, global
gradient clipping at 100, no batch-norm bijector, no zero init). ``seed-report`` adds what the
report says it needed; each ``no-*`` variant removes one of them again.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Variant:
    name: str
    rationale: str
    overrides: dict[str, object] = field(default_factory=dict)
    needs_cuda: bool = False  # fp16 with GradScaler exists only on CUDA


CHRISCHUTE = {
    "stabilizers.scale_fn": "tanh",
    "stabilizers.logit_logdet": "softplus",
    "stabilizers.input_clamp": 0.0,
    "stabilizers.s_clamp": 0.0,
    "stabilizers.weight_norm": True,
    "stabilizers.l2": 5e-5,
    "stabilizers.st_batchnorm": True,
    "stabilizers.bn_bijector": False,
    "stabilizers.zero_init": False,
    "stabilizers.grad_clip": 100.0,
    "stabilizers.amp": "off",
    "stabilizers.warmup_steps": 0,
}

# The seed report's recipe. "Softplus" is read as the coupling scale (the reading that changes the
# model; the logit log-det reading is ablated separately by no-softplus-logit). Its input clamp is
# the logit-space clamp at 3.0, which never binds on valid dequantized pixels with alpha = 0.05
# (|y| <= 2.944): both readings of "restricting the values of the input" are guards, not changes.
# AMP is bf16 so the recipe runs on CPUs and GPUs alike; seed-report-fp16 is the literal
# fp16 + GradScaler recipe the report ran on a T4.
SEED_REPORT = {
    **CHRISCHUTE,
    "stabilizers.scale_fn": "softplus",
    "stabilizers.input_clamp": 3.0,
    "stabilizers.amp": "bf16",
}

PAPER = {
    **CHRISCHUTE,
    "stabilizers.bn_bijector": True,
    "stabilizers.grad_clip": 0.0,
}


def _minus(key: str, value: object) -> dict[str, object]:
    return {**SEED_REPORT, key: value}


# one variant per line reads as a table
STABILIZERS: tuple[Variant, ...] = (
    Variant("seed-report", "the seed report's recipe: every stabilizer it names, on", SEED_REPORT),
    Variant("no-softplus", "softplus scale replaced by chrischute's tanh-rescaled scale", _minus("stabilizers.scale_fn", "tanh")),
    Variant("no-softplus-logit", "the other reading: the logit log-det written with logs, not softplus", _minus("stabilizers.logit_logdet", "log")),
    Variant("no-clamp", "no clamping of the logit-space input", _minus("stabilizers.input_clamp", 0.0)),
    Variant("no-gradclip", "no gradient clipping", _minus("stabilizers.grad_clip", 0.0)),
    Variant("no-weightnorm", "plain convolutions in s/t (L2 then falls on their weights)", _minus("stabilizers.weight_norm", False)),
    Variant("no-l2", "no L2 on the weight-norm magnitudes", _minus("stabilizers.l2", 0.0)),
    Variant("amp-off", "full fp32, no mixed precision", _minus("stabilizers.amp", "off")),
    Variant("seed-report-fp16", "the literal recipe: fp16 autocast with GradScaler (CUDA only)", _minus("stabilizers.amp", "fp16"), needs_cuda=True),
    Variant("paper", "what the paper describes: tanh scale, batch norm and its bijector, weight norm, L2; no clipping, no AMP", PAPER),
    Variant("paper-literal-exp", "the paper's eq. 2 literally: unbounded exp scale, nothing added", {**PAPER, "stabilizers.scale_fn": "exp"}),
    Variant("chrischute", "the public PyTorch reproduction the seed report copied, as configured there", CHRISCHUTE),
)  # fmt: skip

STUDIES: dict[str, tuple[Variant, ...]] = {"stabilizers": STABILIZERS}
STUDY_DESCRIPTIONS = {"stabilizers": "which of the seed report's stabilizers does Real NVP need?"}


def get_study(name: str) -> tuple[Variant, ...]:
    if name not in STUDIES:
        raise KeyError(f"unknown study {name!r}: `run_study.py ablation --list` shows {', '.join(STUDIES)}")
    return STUDIES[name]
