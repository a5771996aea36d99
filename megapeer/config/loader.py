"""YAML files + dotted overrides -> typed, validated Config."""
import dataclasses
import os
import typing
from typing import Any, List, Optional

import yaml

from .schema import Config


class ConfigError(ValueError):
    """A bad configuration value; the message names the key and where it came from."""


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp, key: str, source: str):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(value, inner[0], key, source)
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{source}: '{key}' must be one of {list(args)}, got {value!r}")
        return value
    if origin in (list, List):
        if not isinstance(value, list):
            raise ConfigError(f"{source}: '{key}' must be a list, got {value!r}")
        return [_convert(v, args[0], f"{key}[{i}]", source) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: '{key}' must be a mapping, got {value!r}")
        return _build(tp, value, key, source)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: '{key}' must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: '{key}' must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads '1e-3' (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: '{key}' must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. a prefix or split written without quotes
        if not isinstance(value, str):
            raise ConfigError(f"{source}: '{key}' must be a string, got {value!r}")
        return value
    raise ConfigError(f"{source}: '{key}' has unsupported type {_type_name(tp)}")


def _build(cls, data: dict, prefix: str, source: str):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in data:
        if k not in names:
            where = f"{prefix}.{k}" if prefix else k
            raise ConfigError(f"{source}: unknown key '{where}' (known: {sorted(names)})")
    kwargs = {}
    for k, v in data.items():
        where = f"{prefix}.{k}" if prefix else k
        kwargs[k] = _convert(v, hints[k], where, source)
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any, source: str) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{source}: '{dotted}' goes through a non-mapping value")
    node[parts[-1]] = value


def _merge(cfg, tree: dict, prefix: str, source: str):
    """Apply a (partial) nested dict onto an existing dataclass instance."""
    hints = typing.get_type_hints(type(cfg))
    names = {f.name for f in dataclasses.fields(cfg)}
    for k, v in tree.items():
        where = f"{prefix}.{k}" if prefix else k
        if k not in names:
            raise ConfigError(f"{source}: unknown key '{where}' (known: {sorted(names)})")
        cur = getattr(cfg, k)
        if dataclasses.is_dataclass(cur) and isinstance(v, dict):
            _merge(cur, v, where, source)
        else:
            setattr(cfg, k, _convert(v, hints[k], where, source))
    return cfg


def parse_overrides(overrides: List[str]) -> dict:
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}': expected dotted.key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override '{item}': cannot parse value: {e}") from None
        _set_dotted(tree, key.strip(), value, f"override '{item}'")
    return tree


def read_yaml_mapping(path: str, error=ConfigError, what: str = "config") -> dict:
    """A YAML file whose top level is a mapping; `error` names the file on any problem."""
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise error(f"{what} file not found: {path}") from None
    except yaml.YAMLError as e:
        raise error(f"{path}: invalid YAML: {e}") from None
    if not isinstance(data, dict):
        raise error(f"{path}: top level must be a mapping")
    return data


def load_config(path: Optional[str] = None, overrides: Optional[List[str]] = None,
                world_size: Optional[int] = None, validate: bool = True) -> Config:
    """Load `path` (YAML), apply `overrides` (["a.b=1", ...]) and validate.

    world_size defaults to $WORLD_SIZE, else $SLURM_NTASKS, else 1. Nothing here touches
    torch.distributed.
    """
    cfg = Config()
    if path is not None:
        _merge(cfg, read_yaml_mapping(path, ConfigError, "config"), "", path)
    for item in overrides or []:
        _merge(cfg, parse_overrides([item]), "", f"override '{item}'")
    if validate:
        from .validate import validate_config
        if world_size is None:
            world_size = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")))
        validate_config(cfg, world_size, source=path or "<defaults>")
    return cfg


def config_to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg, path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        yaml.safe_dump(config_to_dict(cfg), f, sort_keys=False)
    os.replace(tmp, path)
