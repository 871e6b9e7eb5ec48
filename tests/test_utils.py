"""Plumbing: the one name sanitiser, the one output-folder rule every command follows, the run-configuration file."""

from __future__ import annotations

import json
import logging

import pytest

from colintern.utils import OUTPUT_RECORD, RUN_CONFIG_FILE, ColinternError, prepare_output_dir, read_run_config, safe_name


def test_safe_name_is_always_one_plain_path_component():
    assert safe_name("AnnualReportsRetrieval") == "AnnualReportsRetrieval"
    assert safe_name("tiny-internvl3_5.v2") == "tiny-internvl3_5.v2"
    assert safe_name("../../../../../x") == "x"
    assert safe_name("a/b\\c d") == "a-b-c-d"
    assert safe_name("..") == safe_name("") == safe_name("/") == "item"
    assert safe_name(".hidden", fallback="model") == "hidden"
    assert safe_name("\x00evil\n") == "evil"
    long_a, long_b = "a" * 300, "a" * 299 + "b"
    assert len(safe_name(long_a)) <= 120 and safe_name(long_a) != safe_name(long_b)
    for text in ("../x", "x/../../y", "~/.ssh/id", "C:\\x", "...", "-rf", "ünïcödé/名前"):
        name = safe_name(text)
        assert "/" not in name and name not in (".", "..") and not name.startswith((".", "-")) and name


def test_an_output_on_an_input_is_refused_naming_both(tmp_path):
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (tmp_path / "link").symlink_to(data)
    cases = [(data, "is"), (data / "sub", "lies inside"), (tmp_path, "contains"), (tmp_path / "link", "is")]
    for out, relation in cases:
        with pytest.raises(ColinternError, match=rf"--out {out} {relation} the input --data {data}"):
            prepare_output_dir(out, command="c", inputs={"--data": data}, overwrite=True, option="--out")
    prepare_output_dir(tmp_path / "new", command="c", inputs={"--data": data, "--hub": "org/model", "--none": None})
    (tmp_path / "file").write_text("x")
    with pytest.raises(ColinternError, match="is a file"):
        prepare_output_dir(tmp_path / "file", command="c")


def test_overwrite_replaces_only_the_commands_own_recorded_names(tmp_path):
    out = tmp_path / "out"
    prepare_output_dir(out, command="c", owned_names=["a.txt", "b"])
    (out / "a.txt").write_text("ours")
    (out / "mine.txt").write_text("the user's")
    with pytest.raises(ColinternError, match="not empty .*mine.txt"):
        prepare_output_dir(out, command="c", owned_names=["a.txt"])
    with pytest.raises(ColinternError, match="mine.txt was not written by c"):
        prepare_output_dir(out, command="c", overwrite=True, owned_names=["a.txt", "mine.txt"])
    with pytest.raises(ColinternError, match="a.txt was not written by other"):  # another command's file
        prepare_output_dir(out, command="other", overwrite=True, owned_names=["a.txt"])
    prepare_output_dir(out, command="other", overwrite=True, owned_names=["z.txt"])
    record = json.loads((out / OUTPUT_RECORD).read_text())["written_by"]
    assert record == {"c": ["a.txt", "b"], "other": ["z.txt"]}


def test_staged_output_installs_its_files_drops_its_stale_ones_and_keeps_the_rest(tmp_path):
    out = tmp_path / "out"
    first = prepare_output_dir(out, command="c")
    with first.staged() as tmp:
        (tmp / "model.bin").write_text("1")
        (tmp / "old-shard.bin").write_text("1")
        (tmp / "folder").mkdir()
        (tmp / "folder" / "x").write_text("1")
    (out / "user.txt").write_text("the user's")
    second = prepare_output_dir(out, command="c", overwrite=True)
    with second.staged() as tmp:
        (tmp / "model.bin").write_text("2")
        (tmp / "folder").mkdir()
        (tmp / "folder" / "y").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == [OUTPUT_RECORD, "folder", "model.bin", "user.txt"]
    assert (out / "model.bin").read_text() == "2" and [p.name for p in (out / "folder").iterdir()] == ["y"]
    assert json.loads((out / OUTPUT_RECORD).read_text())["written_by"]["c"] == ["folder", "model.bin"]

    third = prepare_output_dir(out, command="c", overwrite=True)
    with pytest.raises(ColinternError, match="user.txt was not written by c"), third.staged() as tmp:
        (tmp / "user.txt").write_text("would replace the user's file")
    assert (out / "user.txt").read_text() == "the user's" and (out / "model.bin").read_text() == "2"
    assert not [p for p in out.iterdir() if p.name.endswith(".partial")]


def test_a_failed_run_leaves_no_folder_it_created(tmp_path):
    output = prepare_output_dir(tmp_path / "new", command="c")
    with pytest.raises(RuntimeError), output.staged() as tmp:
        (tmp / "half.bin").write_text("x")
        raise RuntimeError("killed mid-write")
    assert not (tmp_path / "new").exists()
    existing = tmp_path / "kept"
    existing.mkdir()
    output = prepare_output_dir(existing, command="c")
    with pytest.raises(RuntimeError), output.staged():
        raise RuntimeError("killed mid-write")
    assert existing.is_dir()



def test_run_config_is_read_and_a_bad_one_is_ignored_with_a_warning(tmp_path, caplog):
    assert read_run_config(tmp_path) is None  # a folder without one
    (tmp_path / RUN_CONFIG_FILE).write_text(json.dumps({"training": {"lr": 1e-3}}))
    assert read_run_config(tmp_path) == {"training": {"lr": 1e-3}}
    for bad in ("{ truncated", "[1, 2]"):
        (tmp_path / RUN_CONFIG_FILE).write_text(bad)
        with caplog.at_level(logging.WARNING, logger="colintern.utils"):
            assert read_run_config(tmp_path) is None
        assert str(tmp_path / RUN_CONFIG_FILE) in caplog.records[-1].getMessage()
