"""Command-line overrides checked before Hydra runs a script: a mistyped key is one line that names the
closest valid keys (`learning_rate=1e-4` -> `optimizer.lr`), instead of Hydra's "Could not override".

Every Hydra entry point calls `exit_on_bad_overrides` under its `__main__` guard. It composes the
configuration the way Hydra is about to (same config directory, same overrides); a composition that fails
is reported with exit code 2 and no traceback. Sweeps (`-m`) and Hydra's own flags are left to Hydra.
"""

from __future__ import annotations

import difflib
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ssi import EXIT_BAD_INPUT

# Names users bring from other trainers (HF TrainingArguments, torchtune) for the settings they mean here;
# offered only where the composed configuration has the key.
ALIASES = {
    "learning_rate": "optimizer.lr",
    "lr": "optimizer.lr",
    "weight_decay": "optimizer.weight_decay",
    "batch_size": "data.train.dataloader.batch_size",
    "per_device_train_batch_size": "data.train.dataloader.batch_size",
    "warmup_steps": "lr_scheduler.num_warmup_steps",
    "num_warmup_steps": "lr_scheduler.num_warmup_steps",
    "num_train_epochs": "epochs",
    "grad_accum": "gradient_accumulation_steps",
    "model_name_or_path": "model",
    "model_dir": "model",
    "checkpoint_dir": "model",
}
_HYDRA_FLAGS = {"-m", "--multirun", "-h", "--help", "--hydra-help", "--info", "-i", "--cfg", "-c", "--package",
                "-p", "--resolve", "--shell-completion", "-sc", "--config-path", "-cp", "--config-name", "-cn",
                "--config-dir", "-cd", "--version", "--run", "-r", "--experimental-rerun"}  # fmt: skip


def leaf_keys(node: Any, prefix: str = "") -> Iterator[str]:
    """Every dotted key of a configuration, sections included (`optimizer`, `optimizer.lr`, ...)."""
    if isinstance(node, dict):
        for key, value in node.items():
            dotted = f"{prefix}{key}"
            yield dotted
            yield from leaf_keys(value, f"{dotted}.")


def closest_keys(key: str, cfg: DictConfig, n: int = 3) -> list[str]:
    """Keys of `cfg` a user probably meant by `key`: a known alias, then close spellings of the whole dotted
    key, then keys whose last part is spelled closely."""
    keys = list(leaf_keys(OmegaConf.to_container(cfg, resolve=False)))
    leaf = key.rsplit(".", 1)[-1]
    found = [ALIASES[leaf]] if ALIASES.get(leaf) in keys else []
    found += difflib.get_close_matches(key, keys, n=n, cutoff=0.6)
    by_leaf: dict[str, list[str]] = {}
    for candidate in keys:
        by_leaf.setdefault(candidate.rsplit(".", 1)[-1], []).append(candidate)
    for close in difflib.get_close_matches(leaf, list(by_leaf), n=n, cutoff=0.7):
        found += by_leaf[close]
    return list(dict.fromkeys(found))[:n]


def _override_key(override: str) -> str:
    return override.lstrip("+~").split("=", 1)[0]


def _compose(config_name: str, overrides: Sequence[str]) -> tuple[DictConfig | None, str]:
    try:
        return compose(config_name=config_name, overrides=list(overrides)), ""
    except (HydraException, OmegaConfBaseException) as err:
        return None, " ".join(str(err).split())  # Hydra's messages span lines


def override_problem(config_name: str, overrides: Sequence[str], conf_dir: Path) -> str | None:
    """What is wrong with composing `config_name` with `overrides`, in one line; None when it composes."""
    with initialize_config_dir(config_dir=str(conf_dir.resolve()), version_base=None):
        return composition_problem(config_name, overrides, conf_dir)


def composition_problem(config_name: str, overrides: Sequence[str], conf_dir: Path) -> str | None:
    """`override_problem` inside an initialised Hydra (e.g. a command that composes several configurations)."""
    cfg, message = _compose(config_name, overrides)
    if cfg is not None:
        return None
    marker = "Could not override '"
    if "Could not find '" in message:
        return _missing_preset(config_name, message.split("Could not find '", 1)[1].split("'", 1)[0], conf_dir)
    if marker not in message:
        return f"conf/{config_name}.yaml: {message}"
    unknown = message.split(marker, 1)[1].split("'", 1)[0]
    given = next((o for o in overrides if _override_key(o) == unknown), unknown)
    # the configuration without the bad override (the presets it chose included), else the defaults
    cfg = _compose(config_name, [o for o in overrides if _override_key(o) != unknown])[0]
    cfg = cfg if cfg is not None else _compose(config_name, [])[0]
    suggestions = closest_keys(unknown, cfg) if cfg is not None else []
    hint = f"did you mean {' or '.join(suggestions)}? " if suggestions else ""
    return (
        f"{given}: conf/{config_name}.yaml has no setting {unknown!r}; {hint}"
        f"(to add a new key on purpose, write +{given.lstrip('+~')})"
    )


def _missing_preset(config_name: str, missing: str, conf_dir: Path) -> str:
    """`data=sft/nope`: the presets that exist beside the one asked for (Hydra lists only the top folder)."""
    folder = conf_dir / Path(missing).parent
    options = sorted(p.stem for p in folder.glob("*.yaml") if not p.stem.startswith("_"))
    group = str(Path(missing).parent)
    close = difflib.get_close_matches(Path(missing).name, options, n=3, cutoff=0.5)
    hint = f"did you mean {' or '.join(f'{group}/{c}' for c in close)}? " if close else ""
    return (
        f"conf/{config_name}.yaml: there is no preset {missing} (conf/{missing}.yaml); {hint}"
        f"the presets in conf/{group}/ are: {', '.join(options) or 'none'}"
    )


def exit_on_bad_overrides(config_name: str, conf_dir: Path, argv: Sequence[str] | None = None) -> None:
    """Exit with code 2 and one line on stderr if the command line's overrides do not compose."""
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a.split("=", 1)[0] in _HYDRA_FLAGS for a in args):
        return
    problem = override_problem(config_name, [a for a in args if not a.startswith("-")], conf_dir)
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
