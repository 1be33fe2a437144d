"""config.py: ScheduleConfig and StrategyConfig validation."""

import pytest

from framelm.errors import ConfigError
from framelm.schedule import Builder, ScheduleConfig, StrategyConfig
from schedule_fixtures import random_corpus


def test_config_errors():
    with pytest.raises(ConfigError, match="named 'frame'"):
        ScheduleConfig.from_dict({"strategies": [{"kind": "frame"}, {"kind": "frame"}]})
    with pytest.raises(ConfigError, match="needs 'order'"):
        ScheduleConfig.from_dict({"strategies": [{"kind": "permutation"}]})
    with pytest.raises(ConfigError, match=r"blends\[1\]: weights sum to 1.2"):
        StrategyConfig.from_dict({"kind": "two_phase", "blends": [{"a": 1}, {"a": 0.6, "b": 0.6}]})
    with pytest.raises(ConfigError, match="'order' must name every non-empty cell once"):
        Builder(random_corpus(40), ScheduleConfig(strategies=[])).build(StrategyConfig(kind="permutation", order=["Q1", "Q2", "Q3"]))


def test_a_strategy_over_every_cell_hashes_as_before_cells_existed():
    plain, every = ScheduleConfig(), ScheduleConfig(strategies=[StrategyConfig(kind="frame", cells=["Q1"]), StrategyConfig(kind="random")])
    assert all("cells" not in entry for entry in plain.hashed_dict()["strategies"])
    assert every.hashed_dict()["strategies"][0]["cells"] == ["Q1"] and plain.config_hash() != every.config_hash()
