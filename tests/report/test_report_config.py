"""framelm.report.config: ReportConfig's validation."""

from __future__ import annotations

import pytest

from framelm.errors import ConfigError
from framelm.report import ReportConfig


def test_config_validation_names_the_key():
    with pytest.raises(ConfigError, match="density_bins"):
        ReportConfig.from_dict({"density_bins": 1})
    with pytest.raises(ConfigError, match="schedule_groups"):
        ReportConfig.from_dict({"schedule_groups": "stage"})
    for level in (0, 1, 2.0):
        with pytest.raises(ConfigError, match="'significance_level' must lie strictly between 0 and 1"):
            ReportConfig.from_dict({"significance_level": level})
