"""Strict config loading: unknown keys and wrong types are named; overrides are typed."""
import dataclasses

import pytest

from pipeline.config_utils import ConfigError, apply_overrides, from_dict


@dataclasses.dataclass
class Inner:
    lr: float = 1e-3
    steps: int = 10


@dataclasses.dataclass
class Outer:
    name: str = "x"
    inner: Inner = dataclasses.field(default_factory=Inner)
    tags: list[str] = dataclasses.field(default_factory=list)


def test_unknown_key_lists_valid_ones():
    with pytest.raises(ConfigError, match=r"inner: unknown key\(s\) \['stpes'\]; valid keys are \['lr', 'steps'\]"):
        from_dict(Outer, {"inner": {"stpes": 3}})


def test_wrong_type_names_the_path():
    with pytest.raises(ConfigError, match="inner.steps: expected an integer"):
        from_dict(Outer, {"inner": {"steps": "ten"}})


def test_overrides_are_yaml_typed_including_exponent_floats():
    data = apply_overrides({}, ["inner.lr=2e-3", "inner.steps=5", "tags=[a, b]"])
    cfg = from_dict(Outer, data)
    assert cfg.inner.lr == pytest.approx(0.002) and cfg.inner.steps == 5 and cfg.tags == ["a", "b"]


def test_override_without_equals_is_rejected():
    with pytest.raises(ConfigError, match="KEY.PATH=VALUE"):
        apply_overrides({}, ["inner.lr"])


def test_optional_dataclass_field_reports_the_inner_mistake():
    with pytest.raises(ConfigError, match=r"part\.size: expected an integer, got 'big'"):
        from_dict(Holder, {"part": {"size": "big"}})
    with pytest.raises(ConfigError, match=r"part: unknown key\(s\) \['sise'\]"):
        from_dict(Holder, {"part": {"sise": 2}})


@dataclasses.dataclass
class Part:
    size: int = 1


@dataclasses.dataclass
class Holder:
    part: Part | None = None
