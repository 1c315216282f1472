"""What every component's configuration is made of: one option (a dataclass field with
its Megatron-LM flag name, help text, group and choices) and ConfigError.

A component declares its options in a small dataclass where it lives
(``model.ModelConfig``, ``pipeline.config.ScheduleConfig``, ``optim.config.OptimizerConfig``,
...) and validates them there; the run's ``TrainConfig`` composes
them into the flat set of flags and YAML keys (``num_layers`` -> ``--num-layers``).
"""

from __future__ import annotations

from dataclasses import Field, field, fields
from typing import Any, Iterable, List, Optional, Sequence


class ConfigError(ValueError):
    """A configuration value is wrong; the message says which and how to fix it."""


def option(default: Any, help: str, group: str, choices: Optional[Sequence] = None) -> Any:
    """A configuration field: its default, ``--help`` text, help group and choices."""
    return field(default=default, metadata={"help": help, "group": group, "choices": choices})


def flag(name: str) -> str:
    """``num_layers`` -> ``num-layers`` (the flag, without its dashes)."""
    return name.replace("_", "-")


def own_fields(component: type) -> List[Field]:
    """The fields a component config class declares itself (not those of a composition)."""
    return [f for f in fields(component) if f.name in component.__annotations__]


def check_positive(cfg: Any, names: Iterable[str]) -> None:
    for name in names:
        value = getattr(cfg, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"--{flag(name)} must be a positive integer, got {value!r}.")


def check_choices(cfg: Any, component: type) -> None:
    """Every field of ``component`` with choices holds one of them."""
    for f in own_fields(component):
        choices = f.metadata.get("choices")
        if choices and getattr(cfg, f.name) not in choices:
            raise ConfigError(f"--{flag(f.name)} must be one of {list(choices)}, "
                              f"got {getattr(cfg, f.name)!r}.")


def divisors(n: int) -> List[int]:
    return [d for d in range(1, n + 1) if n % d == 0]
