"""Layer policies: which layers every method quantizes, keeps at ``keep_bits`` or leaves in float.

A fair comparison puts every method on the same layers. Each conv/linear layer gets a *role*:

- ``stem``: the first conv (reads the image);
- ``classifier``: the last linear layer;
- ``last_conv``: the last conv that is not the stem;
- ``shortcut``: 1x1 convs on residual shortcuts (modules named ``downsample`` or ``shortcut``);
- ``body``: everything else.

A policy gives each role except ``body`` (always at ``bits``) a treatment: ``bits`` (like the rest:
weights at ``bits``, inputs at ``act_bits``), ``keep`` (weights and inputs at ``keep_bits``) or
``float`` (left alone). ``conf/policy/`` holds the references: ``uniform`` (stem and classifier at
8 bits, everything else at ``bits``), ``qaf`` (the QAF code: shortcuts at 8 bits too) and ``lapq``
(the LAPQ code: stem, last conv and classifier in float).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from qaf.config import ConfigError, check_choice, check_int

ROLES = ("stem", "body", "last_conv", "shortcut", "classifier")
#: Each role in words (the report's legend of policies).
ROLE_NAMES = {"stem": "first conv", "body": "other convs", "last_conv": "last conv",
              "shortcut": "1x1 shortcut convs", "classifier": "classifier"}
TREATMENTS = ("bits", "keep", "float")
_SHORTCUT_NAMES = ("downsample", "shortcut")


@dataclass(frozen=True)
class LayerPolicy:
    """Treatment of each layer role (see the module docstring).

    Attributes
    ----------
    name : str
        Name shown in tables (``uniform``, ``qaf``, ``lapq`` or your own).
    stem, last_conv, shortcut, classifier : {"bits", "keep", "float"}
        Treatment of that role.
    keep_bits : int
        Weight and input-activation bits of ``keep`` layers.
    """

    name: str = "uniform"
    stem: str = "keep"
    last_conv: str = "bits"
    shortcut: str = "bits"
    classifier: str = "keep"
    keep_bits: int = 8

    @classmethod
    def from_config(cls, node: Any) -> "LayerPolicy":
        """Build and validate from the ``policy`` config node (a mapping)."""
        values = dict(node or {})
        unknown = sorted(set(values) - set(cls.__dataclass_fields__))
        if unknown:
            raise ConfigError(f"policy.{unknown[0]} is not a policy key: accepted "
                              f"{', '.join(cls.__dataclass_fields__)}")
        policy = cls(**values)
        for role in ROLES:
            if role == "body":
                continue
            check_choice(f"policy.{role}", getattr(policy, role), TREATMENTS)
        check_int("policy.keep_bits", policy.keep_bits, 2, 16)
        return policy

    def treatment(self, role: str) -> str:
        """``bits``, ``keep`` or ``float`` for a role."""
        return "bits" if role == "body" else getattr(self, role)

    def treatment_text(self, role: str) -> str:
        """A role's treatment in words: ``w/a bits`` (the run's), ``8/8 bits`` (``keep``) or ``float``."""
        treatment = self.treatment(role)
        return "w/a bits" if treatment == "bits" else "float" if treatment == "float" else \
            f"{self.keep_bits}/{self.keep_bits} bits"

    def layer_bits(self, role: str, bits: int, act_bits: int) -> tuple[int, int] | None:
        """(weight bits, input bits) of a layer with this role; None leaves it in float."""
        treatment = self.treatment(role)
        if treatment == "float":
            return None
        return (self.keep_bits, self.keep_bits) if treatment == "keep" else (bits, act_bits)

    def as_dict(self) -> dict[str, Any]:
        """Plain dict (for metrics.json)."""
        return asdict(self)


def layer_roles(model: nn.Module) -> dict[str, str]:
    """The role of every Conv2d and Linear of ``model``, by module name, in module order.

    Parameters
    ----------
    model : nn.Module
        An uncompressed model.

    Returns
    -------
    dict[str, str]
        Module name -> role.
    """
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    roles: dict[str, str] = {}
    for name in convs:
        module = model.get_submodule(name)
        parts = name.split(".")
        if name == convs[0]:
            roles[name] = "stem"
        elif module.kernel_size == (1, 1) and any(p in _SHORTCUT_NAMES for p in parts):
            roles[name] = "shortcut"
        else:
            roles[name] = "body"
    body = [n for n in convs if roles[n] == "body"]
    if body:
        roles[body[-1]] = "last_conv"
    for name in linears:
        roles[name] = "classifier" if name == linears[-1] else "body"
    return roles


def layer_plan(model: nn.Module, policy: LayerPolicy, bits: int, act_bits: int) -> dict[str, tuple[int, int] | None]:
    """(weight bits, input bits) or None (float) for every conv/linear of ``model``.

    Parameters
    ----------
    model : nn.Module
        An uncompressed model.
    policy : LayerPolicy
        The layer policy.
    bits, act_bits : int
        The run's weight and activation bit widths.

    Returns
    -------
    dict
        Module name -> bits or None.
    """
    return {name: policy.layer_bits(role, bits, act_bits) for name, role in layer_roles(model).items()}
