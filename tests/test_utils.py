"""Plumbing: the run-configuration file every run folder may hold."""

import json
import logging

from colintern.utils import RUN_CONFIG_FILE, read_run_config


def test_run_config_is_read_and_a_bad_one_is_ignored_with_a_warning(tmp_path, caplog):
    assert read_run_config(tmp_path) is None  # a folder without one
    (tmp_path / RUN_CONFIG_FILE).write_text(json.dumps({"training": {"lr": 1e-3}}))
    assert read_run_config(tmp_path) == {"training": {"lr": 1e-3}}
    for bad in ("{ truncated", "[1, 2]"):
        (tmp_path / RUN_CONFIG_FILE).write_text(bad)
        with caplog.at_level(logging.WARNING, logger="colintern.utils"):
            assert read_run_config(tmp_path) is None
        assert str(tmp_path / RUN_CONFIG_FILE) in caplog.records[-1].getMessage()
