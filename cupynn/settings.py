"""The settings of a training run, declared once for :func:`cupynn.fit` and :class:`cupynn.Trainer`.

As scikit-learn's ``_parameter_constraints``: one table (:data:`SETTINGS`)
gives each keyword its default and its check, and both ``fit`` and
``Trainer`` take them as ``**settings``, checked by :func:`check_settings`;
:func:`takes_settings` gives both the signature that ``help()`` and
``inspect.signature`` show. The settings that need the run's other objects
(``redistribution``, ``comm``, ``sample_weight``, the data) are checked by the
trainer, which has them; here they are declared with their defaults only.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .evaluation import EVAL_BATCH
from .losses import LOSSES
from .redistribution.schedule import SCHEDULES, UNITS
from .validation import check_choice, check_int, check_real

REQUIRED = inspect.Parameter.empty


@dataclass(frozen=True)
class Setting:
    """A keyword's default (:data:`REQUIRED`: none) and its check ``(value, name, owner)
    -> value`` (None: checked where it is used)."""

    default: Any
    check: Callable[[Any, str, str], Any] | None = None


def _int(low: int) -> Callable[[Any, str, str], int]:
    return lambda value, name, owner: check_int(value, name, owner, low=low)


def _fraction(value: Any, name: str, owner: str) -> float:
    return check_real(value, name, owner, 0.0, 1.0)


def _choice(choices: tuple[str, ...]) -> Callable[[Any, str, str], str]:
    return lambda value, name, owner: check_choice(value, name, owner, choices)


def _graph(value: Any, name: str, owner: str) -> Any:
    from .graph import GRAPH_MODES

    if not any(value is mode or (isinstance(value, str) and value == mode)
               for mode in GRAPH_MODES):
        raise ValueError(f"The {name!r} parameter of {owner} must be 'auto', True or False. "
                         f"Got {value!r} instead.")
    return value


def _callable(value: Any, name: str, owner: str) -> Any:
    if value is not None and not callable(value):
        raise TypeError(f"The {name!r} parameter of {owner} must be callable. Got {value!r}.")
    return value


# In the order of fit's signature; the checks run in this order.
SETTINGS: dict[str, Setting] = {
    "epochs": Setting(REQUIRED, _int(1)),
    "batch_size": Setting(REQUIRED, _int(1)),
    "loss": Setting("cross_entropy", _choice(tuple(LOSSES))),
    "seed": Setting(0, _int(0)),
    "progress": Setting(True),
    "eval_batch_size": Setting(EVAL_BATCH, _int(1)),
    "redistribution": Setting(None),
    "alpha": Setting(0.5, _fraction),
    "redistribute_every": Setting(1, _int(1)),
    "end_fraction": Setting(0.75, _fraction),
    "growth_batches": Setting(1, _int(1)),
    "augment": Setting(None, _callable),
    "track_memory": Setting(False),
    "on_epoch_end": Setting(None, _callable),
    "comm": Setting(None),
    "schedule": Setting("cosine", _choice(SCHEDULES)),
    "redistribute_unit": Setting("epoch", _choice(UNITS)),
    "sample_weight": Setting(None),
    "graph": Setting("auto", _graph),
}


def check_settings(settings: dict[str, Any], owner: str = "fit") -> dict[str, Any]:
    """Every setting of :data:`SETTINGS`, given or default, checked; a TypeError for a
    keyword it does not declare or a required one missing, as a signature would."""
    unknown = [name for name in settings if name not in SETTINGS]
    if unknown:
        close = difflib.get_close_matches(unknown[0], SETTINGS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise TypeError(f"{owner}() got an unexpected keyword argument {unknown[0]!r}.{hint}")
    missing = [name for name, s in SETTINGS.items() if s.default is REQUIRED and name not in settings]
    if missing:
        raise TypeError(f"{owner}() missing required keyword argument(s): "
                        f"{', '.join(map(repr, missing))}")
    checked = {}
    for name, setting in SETTINGS.items():
        value = settings.get(name, setting.default)
        checked[name] = value if setting.check is None else setting.check(value, name, owner)
    return checked


def takes_settings(function: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator for a function taking ``**settings``: its signature becomes its own
    leading parameters followed by the settings, keyword-only with their defaults."""
    own = [p for p in inspect.signature(function).parameters.values()
           if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    keywords = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=s.default)
                for name, s in SETTINGS.items()]
    function.__signature__ = inspect.signature(function).replace(parameters=own + keywords)
    return function
