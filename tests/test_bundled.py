"""Bundled study files and search spaces: found relative to the package from any working folder, an
existing path always wins, and a name that is neither is one line listing the bundled names."""

from __future__ import annotations

import pytest

from autocompress.bundled import BUNDLED_SPACES, BUNDLED_STUDIES, bundled_names
from autocompress.config import configure, load_config, resolve_space_file
from autocompress.errors import ConfigError

QUICKSTART = BUNDLED_STUDIES / "quickstart.yaml"
DEFAULT_SPACE = BUNDLED_SPACES / "default.yaml"


def test_the_package_ships_its_studies_and_spaces():
    assert {"quickstart", "mnist1d_cnn", "bert_encoder"} <= set(bundled_names(BUNDLED_STUDIES))
    assert {"default", "int8_linear", "prune_only"} <= set(bundled_names(BUNDLED_SPACES))


@pytest.mark.parametrize("spelling", ["quickstart", "quickstart.yaml", "studies/quickstart.yaml"])
def test_a_bundled_study_loads_from_an_empty_folder(tmp_path, monkeypatch, spelling):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(spelling)
    assert cfg.name == "quickstart" and cfg.source == str(QUICKSTART)
    assert cfg.output_dir().as_posix() == "runs/quickstart"  # under the working folder
    assert resolve_space_file(cfg) == DEFAULT_SPACE


def test_a_local_file_wins_over_the_bundled_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "quickstart.yaml").write_text(
        "name: mine\ntask: {name: digits}\nspace: {file: default.yaml}\n"
    )
    (tmp_path / "default.yaml").write_text("bits: {choices: [8, 32]}\n")
    cfg = load_config("quickstart.yaml")
    assert cfg.name == "mine" and cfg.source == "quickstart.yaml"
    assert resolve_space_file(cfg).resolve() == tmp_path / "default.yaml"


def test_a_space_beside_the_study_file_wins_over_the_bundled_one(tmp_path, monkeypatch):
    (tmp_path / "study").mkdir()
    (tmp_path / "study" / "s.yaml").write_text("name: s\ntask: {name: digits}\nspace: {file: default.yaml}\n")
    (tmp_path / "study" / "default.yaml").write_text("bits: {choices: [8, 32]}\n")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    cfg = load_config("../study/s.yaml")
    assert resolve_space_file(cfg) == tmp_path / "study" / "default.yaml"


@pytest.mark.parametrize("spelling", ["default", "default.yaml", "search_spaces/default.yaml"])
def test_every_spelling_of_a_bundled_space(tmp_path, monkeypatch, spelling):
    monkeypatch.chdir(tmp_path)
    cfg = configure(name="x", task={"name": "digits"}, space={"file": spelling})
    assert resolve_space_file(cfg) == DEFAULT_SPACE
    assert configure(name="x", task={}).space.file == "default.yaml"


def test_unknown_names_are_one_line_listing_the_bundled_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    studies = ", ".join(bundled_names(BUNDLED_STUDIES))
    with pytest.raises(ConfigError) as info:
        load_config("quickstrat")
    assert str(info.value) == f"quickstrat: study file does not exist, nor is it a bundled study ({studies})"
    spaces = ", ".join(bundled_names(BUNDLED_SPACES))
    for spelling in ("defualt.yaml", "elsewhere/default.yaml"):
        cfg = configure(name="x", task={}, space={"file": spelling})
        with pytest.raises(ConfigError) as info:
            resolve_space_file(cfg)
        assert str(info.value) == (
            f"configure(): space.file: search space file {spelling!r} does not exist, nor is it a bundled "
            f"space ({spaces})"
        )
