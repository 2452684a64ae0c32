"""Hydra/OmegaConf configuration as plain Python values, and the one error for a missing setting."""

from __future__ import annotations

from typing import Any

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import InterpolationToMissingValueError, MissingMandatoryValue


class MissingSettingError(ValueError):
    """A required setting (`???` in the YAML) that the command line did not give."""


def to_container(node: Any) -> Any:
    """A plain dict/list from an OmegaConf node (interpolations resolved); other values unchanged."""
    if isinstance(node, (DictConfig, ListConfig)):
        return OmegaConf.to_container(node, resolve=True)
    return node


def resolve_present(node: DictConfig | ListConfig) -> Any:
    """Like `to_container`, except that a value that is `???`, or that interpolates to one, stays `???`
    instead of raising: a command that reads part of a preset (generation reads one split) must not need
    the values it never reads (the training source of a test-only command). Reading a `???` later still
    fails by name (`required`, `check_complete`)."""

    def value(parent: DictConfig | ListConfig, key: Any) -> Any:
        if OmegaConf.is_missing(parent, key):
            return MISSING
        try:
            child = parent[key]
        except InterpolationToMissingValueError:
            return MISSING
        return resolve_present(child) if isinstance(child, (DictConfig, ListConfig)) else child

    if isinstance(node, ListConfig):
        return [value(node, i) for i in range(len(node))]
    return {key: value(node, key) for key in node}


def select(cfg: DictConfig, key: str) -> Any:
    """The value at a dotted key as plain Python (None where absent or `???`)."""
    return to_container(OmegaConf.select(cfg, key, throw_on_missing=False))


def required(cfg: DictConfig, key: str, hint: str = "") -> Any:
    """The value at a dotted key, or a `MissingSettingError` naming it."""
    try:
        value = OmegaConf.select(cfg, key, throw_on_missing=True)
    except MissingMandatoryValue:
        value = None
    if value is None:
        raise MissingSettingError(f"missing required setting {key}: pass {key}=... on the command line{hint}")
    return to_container(value)


def check_complete(cfg: DictConfig) -> None:
    """Raise `MissingSettingError` for the first `???` anywhere in the config."""
    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as err:
        raise MissingSettingError(
            f"missing required setting {err.full_key}: pass {err.full_key}=... on the command line"
        ) from None


def model_dir_setting(cfg: DictConfig) -> None:
    """`model=` names the model directory in every entry point. The recipes also accept the reference
    project's spelling, `checkpointer.checkpoint_dir=` (by default an interpolation of `model`): given
    explicitly, it wins and is recorded as `model` too."""
    checkpointer = cfg.get("checkpointer")
    if checkpointer is None or OmegaConf.is_interpolation(checkpointer, "checkpoint_dir"):
        return
    if OmegaConf.is_missing(checkpointer, "checkpoint_dir"):
        return
    cfg.model = checkpointer.checkpoint_dir


def per_method(method: str, units: Any, features: Any) -> Any:
    """`${ssi.per_method:${method},<units value>,<features value>}`: a preset value that follows the run's
    method, so one preset serves a `-m method=units,features` sweep (conf/data/sft/paired_folder.yaml)."""
    if method not in ("units", "features"):
        raise ValueError(f"ssi.per_method: method must be units or features, got {method!r}")
    return units if method == "units" else features


if not OmegaConf.has_resolver("ssi.per_method"):
    OmegaConf.register_new_resolver("ssi.per_method", per_method)
