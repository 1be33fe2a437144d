from dataclasses import dataclass
from typing import Literal, Optional

import pytest

from framelm.config import ConfigError, StageConfig, apply_override, field, load_yaml


@dataclass
class Inner(StageConfig):
    n_layers: int = field(2, help="layers")


@dataclass
class Demo(StageConfig):
    name: str = field("x", help="a name")
    ratio: float = field(0.5, help="a ratio")
    mode: Literal["a", "b"] = field("a", help="a mode")
    tags: list[str] = field(default_factory=list, help="tags")
    limit: Optional[int] = field(None, help="optional limit")
    quota: dict[str, float] = field(default_factory=dict, help="per-name quota")
    workers: int = field(1, help="workers", hash=False)
    inner: Inner = field(default_factory=Inner, help="nested")

    def validate(self):
        if not 0 <= self.ratio <= 1:
            raise ConfigError(f"ratio must be in [0, 1], got {self.ratio}")


def test_from_dict_converts_and_nests():
    cfg = Demo.from_dict({"ratio": 1, "tags": ["p"], "inner": {"n_layers": 4}, "limit": None, "quota": {"web": 2}})
    assert cfg.ratio == 1.0 and isinstance(cfg.ratio, float)
    assert cfg.inner.n_layers == 4 and cfg.tags == ["p"] and cfg.limit is None
    assert cfg.quota == {"web": 2.0} and isinstance(cfg.quota["web"], float)  # a mapping's values are converted too


@pytest.mark.parametrize(
    "data, message",
    [
        ({"rato": 0.1}, "unknown key 'demo.rato'; did you mean 'ratio'"),
        ({"ratio": "high"}, "'demo.ratio' must be a number"),
        ({"mode": "c"}, "'demo.mode' = 'c' is not allowed"),
        ({"tags": "p"}, "'demo.tags' must be a list"),
        ({"inner": {"n_layer": 3}}, "unknown key 'demo.inner.n_layer'"),
        ({"inner": {"n_layers": 2.5}}, "'demo.inner.n_layers' must be an integer"),
        ({"quota": ["web"]}, "'demo.quota' must be a mapping, got list"),
        ({"quota": {"web": "lots"}}, "'demo.quota.web' must be a number"),
    ],
)
def test_errors_name_the_key(data, message):
    with pytest.raises(ConfigError) as exc:
        Demo.from_dict(data, where="demo")
    assert message in str(exc.value)


def test_a_validate_error_is_prefixed_with_where_once():
    # validate() knows only its own fields; from_dict says which section of the config it was
    with pytest.raises(ConfigError) as exc:
        Demo.from_dict({"ratio": 2}, where="demo")
    assert str(exc.value) == "demo: ratio must be in [0, 1], got 2.0"
    with pytest.raises(ConfigError) as exc:
        Demo.from_dict({"ratio": 2})
    assert str(exc.value) == "ratio must be in [0, 1], got 2.0"
    with pytest.raises(ConfigError) as exc:  # a message that already starts with where is not prefixed again
        Demo.from_dict({"ratio": 2}, where="ratio")
    assert str(exc.value) == "ratio must be in [0, 1], got 2.0"


def test_hash_ignores_execution_details():
    a, b, c = Demo.from_dict({"workers": 1}), Demo.from_dict({"workers": 8}), Demo.from_dict({"ratio": 0.25})
    assert a.config_hash() == b.config_hash() != c.config_hash()


def test_yaml_errors_name_file_and_line(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("a: 1\nb: [unclosed\n")
    with pytest.raises(ConfigError, match=r"c.yaml at line \d+"):
        load_yaml(p)


def test_override_parses_yaml_values():
    data = {"train": {"lr": 1.0}}
    apply_override(data, "train.lr=3e-4")
    apply_override(data, "model.tied=true")
    assert data == {"train": {"lr": 3e-4}, "model": {"tied": True}}
    with pytest.raises(ConfigError, match="key.subkey=value"):
        apply_override(data, "novalue")
    data["schedule"] = {"strategies": [{"kind": "frame"}]}
    with pytest.raises(ConfigError, match=r"'schedule.strategies' is a list, whose items have no dotted keys; set the "
                                          r"whole list, e.g. --set 'schedule.strategies=\[...\]'"):
        apply_override(data, "schedule.strategies.0.kind=random")


def test_unknown_key_message_is_punctuated_with_and_without_a_suggestion():
    with pytest.raises(ConfigError) as exc:
        Demo.from_dict({"zzz": 1}, where="demo")
    assert str(exc.value).startswith("unknown key 'demo.zzz'; allowed keys of demo: inner, limit,")
    with pytest.raises(ConfigError) as exc:
        Demo.from_dict({"rato": 1}, where="demo")
    assert "unknown key 'demo.rato'; did you mean 'ratio'? Allowed keys of demo: " in str(exc.value)
