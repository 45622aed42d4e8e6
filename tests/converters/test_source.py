"""open_source: a local directory, or a hub id; a missing path says which it was taken for.

No network: ``snapshot_download`` is replaced by a fake that records its calls and raises the
hub's own errors (or returns a local copy, as a cache hit would).
"""

from __future__ import annotations

import shutil
import types

import pytest
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

import kiln
from kiln.checkpoint import load_config
from kiln.converters.source import open_source
from kiln.errors import CheckpointError, HubError
from tests.models import hf_model


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return hf_model("llama-gqa", tmp_path_factory.mktemp("hf") / "model")


def _http(cls, message):
    response = types.SimpleNamespace(headers={}, request=None)
    return cls(message, response=response)


@pytest.fixture
def hub(monkeypatch):
    """hub(result) makes snapshot_download return ``result`` (or raise it); lists the calls."""
    calls: list[str] = []
    outcome: list = [LocalEntryNotFoundError("not in cache")]

    def fake(repo_id, revision=None, allow_patterns=None):
        calls.append(repo_id if revision is None else f"{repo_id}@{revision}")
        if isinstance(outcome[0], BaseException):
            raise outcome[0]
        return str(outcome[0])

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake)

    def set_outcome(result):
        outcome[0] = result
        return calls
    return set_outcome


@pytest.fixture
def cwd(tmp_path, monkeypatch):
    """A working directory holding models/llama-tiny/ (an empty dir is enough to be found)."""
    (tmp_path / "models" / "llama-tiny").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("path, hint", [
    ("./models/llama-tny", " (did you mean models/llama-tiny?)"),
    ("../no-such-dir-kiln", " (../ has no no-such-dir-kiln)"),
    ("models/llama-tiny/extra/x", " (models/llama-tiny/ has no extra)"),
    ("a/b/c", ""),
    ("x", ""),
    ("~/no-such-dir-kiln", None),  # the hint names the home directory
])
def test_missing_paths_that_are_not_hub_ids(cwd, hub, path, hint):
    calls = hub(AssertionError("the hub must not be asked"))
    with pytest.raises(CheckpointError) as err:
        open_source(path)
    message = str(err.value)
    assert message.startswith(f"{path}: no such local directory")
    assert message.endswith(", and not a hub id (those have the form org/name); check the path")
    if hint is not None:
        assert message == (f"{path}: no such local directory{hint}, and not a hub id (those have "
                           f"the form org/name); check the path")
    assert calls == []


def test_absolute_missing_path(tmp_path, hub):
    calls = hub(AssertionError("the hub must not be asked"))
    with pytest.raises(CheckpointError, match=f"^{tmp_path}/nope/x: no such local directory "
                                              rf"\({tmp_path}/ has no nope\), and not a hub id"):
        open_source(str(tmp_path / "nope" / "x"))
    assert calls == []


@pytest.mark.parametrize("path, hint", [
    ("models/llama-tny", " (did you mean models/llama-tiny?)"),
    ("mdels/llama-tiny", " (did you mean models/llama-tiny?)"),
    ("models/x", " (models/ has no x)"),
    ("some-org/some-model", ""),
])
def test_org_name_form_is_tried_on_the_hub_too(cwd, hub, monkeypatch, path, hint):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    calls = hub(LocalEntryNotFoundError("not in the cache"))
    with pytest.raises(HubError) as err:
        open_source(path)
    assert str(err.value) == (
        f"{path}: no such local directory{hint}, and the hub cannot provide {path}: offline "
        f"(HF_HUB_OFFLINE is set) and it is not in the local cache; fix the path, or download "
        f"it where the hub is reachable and pass its directory")
    assert calls == [path]


@pytest.mark.parametrize("error, why", [
    (_http(RepositoryNotFoundError, "404 Client Error"),
     "the hub has no such model (or it is private); fix the path or the id"),
    (_http(GatedRepoError, "403 Client Error"),
     "the model is gated; accept its terms on huggingface.co and set HF_TOKEN"),
    (_http(RevisionNotFoundError, "404 Client Error"),
     "the hub model has no revision v9; fix revision"),
    (_http(HfHubHTTPError, "500 Server Error\nInternal"),
     "the hub refused the download (500 Server Error); fix the path"),
])
def test_hub_errors_mention_the_missing_local_directory(cwd, hub, error, why):
    calls = hub(error)
    with pytest.raises(HubError) as err:
        open_source("models/x", revision="v9")
    message = str(err.value)
    assert message.startswith("models/x: no such local directory (models/ has no x), and the hub "
                              "cannot provide models/x@v9: ")
    assert why in message and "\n" not in message
    assert calls == ["models/x@v9"]


def test_a_local_directory_wins_over_the_hub(cwd, hub, hf_dir):
    calls = hub(AssertionError("the hub must not be asked"))
    shutil.copytree(hf_dir, cwd / "org" / "name")
    source = open_source("org/name")
    assert source.repo_id is None and str(source.directory) == "org/name"
    assert calls == []


def test_hub_id_converts_from_the_download(tmp_path, hub, hf_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    calls = hub(hf_dir)
    out = kiln.convert_checkpoint("some-org/some-model", tmp_path / "out", progress=False)
    assert load_config(out).source["repo_id"] == "some-org/some-model"
    assert calls == ["some-org/some-model"]
