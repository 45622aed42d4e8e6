"""kiln.datasets.load_texts: local txt/jsonl/parquet/dir sources, the hub path (snapshot_download
monkeypatched: no network) and every one-line error."""

from __future__ import annotations

import hashlib
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kiln import datasets
from kiln.datasets import TextDataset, load_texts
from kiln.errors import DatasetError, KilnError


def _one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_txt_is_split_into_paragraphs(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes("\ufeffFirst para,\nstill first.\n\n  \nSecond.\r\n\r\nThird.\n\n\n".encode())
    data = load_texts(path)
    assert data == TextDataset(texts=("First para,\nstill first.", "Second.", "Third."),
                               name="a.txt", kind="txt",
                               sha256=hashlib.sha256(path.read_bytes()).hexdigest())
    assert data.joined() == "First para,\nstill first.\n\nSecond.\n\nThird."
    with pytest.raises(AttributeError):
        data.name = "x"  # frozen


def test_jsonl_texts_and_blank_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "one", "id": 1}\n\n{"text": "  "}\n{"text": "two"}\n')
    data = load_texts(str(path))
    assert data.texts == ("one", "two") and data.kind == "jsonl"


@pytest.mark.parametrize(("body", "expected"), [
    ('{"text": "a"}\n{"title": "b"}\n', "line 2 has no 'text' key (found ['title'])"),
    ('{"text": "a"}\n[1]\n', "line 2 has no 'text' key (found list)"),
    ('{"text": "a"}\n\n{"text": 3}\n', "line 3: 'text' is a number, expected a string"),
    ('{"text": "a"\n', "line 1 is not valid JSON"),
])
def test_jsonl_errors_name_the_line(tmp_path, body, expected):
    path = tmp_path / "d.jsonl"
    path.write_text(body)
    with pytest.raises(DatasetError) as error:
        load_texts(path)
    assert expected in _one_line(error) and str(path) in str(error.value)


def test_parquet_text_column(tmp_path):
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"text": ["alpha", "", "beta"], "n": [1, 2, 3]}), path)
    data = load_texts(path)
    assert data.texts == ("alpha", "beta") and data.kind == "parquet"
    assert data.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize(("table", "expected"), [
    (pa.table({"content": ["a"]}), "no 'text' column (columns: content)"),
    (pa.table({"text": [1, 2]}), "column 'text' has type int64, expected strings"),
    (pa.table({"text": ["a", None]}), "row 1 of column 'text' is null"),
])
def test_parquet_errors(tmp_path, table, expected):
    path = tmp_path / "t.parquet"
    pq.write_table(table, path)
    with pytest.raises(DatasetError) as error:
        load_texts(path)
    assert expected in _one_line(error)


def test_corrupt_parquet(tmp_path):
    path = tmp_path / "t.parquet"
    path.write_bytes(b"not parquet at all")
    with pytest.raises(DatasetError) as error:
        load_texts(path)
    assert "cannot read as parquet" in _one_line(error)


def test_directory_reads_first_kind_sorted(tmp_path, caplog):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.jsonl").write_text('{"text": "b"}\n')
    (tmp_path / "a.jsonl").write_text('{"text": "a"}\n')
    (tmp_path / "notes.txt").write_text("ignored: jsonl comes first")
    (tmp_path / "README.md").write_text("not a dataset kind: not named")
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "x.jsonl").write_text('{"text": "hidden"}\n')
    with caplog.at_level("WARNING", "kiln.datasets"):
        data = load_texts(tmp_path)
    assert data.texts == ("a", "b") and data.kind == "dir"
    # a trial's .txt beside a .jsonl had been dropped without a word at the default level
    assert caplog.messages == [f"dataset {tmp_path}: reads its 2 .jsonl files only (a directory "
                               f"is read as one kind: .parquet, else .jsonl, else .txt); not "
                               f"read: notes.txt"]
    lines = "".join(f"{hashlib.sha256((tmp_path / p).read_bytes()).hexdigest()}  {p}\n"
                    for p in ("a.jsonl", "sub/b.jsonl"))
    assert data.sha256 == hashlib.sha256(lines.encode()).hexdigest()


@pytest.mark.parametrize(("name", "content", "expected"), [
    ("empty.txt", b"", "holds no text"),
    ("blank.txt", b"\n \n\t\n", "holds no text"),
    ("empty.jsonl", b"\n", "holds no text"),
    ("latin1.txt", "caf\u00e9\nna\u00efve".encode("latin-1"),
     "not UTF-8 text (invalid byte 0xe9 at line 1, byte offset 3)"),
    ("data.csv", b"text\na\n", "unsupported dataset file type '.csv'"),
])
def test_bad_files(tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DatasetError) as error:
        load_texts(path)
    assert expected in _one_line(error)


def test_missing_and_empty_paths(tmp_path):
    with pytest.raises(DatasetError) as error:
        load_texts(tmp_path / "nope.txt")
    assert "no such file or directory" in _one_line(error) and "check the path" in str(error.value)
    (tmp_path / "english.txt").write_text("Some text.")
    with pytest.raises(DatasetError) as error:  # a typo: the file it most likely meant
        load_texts(tmp_path / "englsh.txt")
    assert str(error.value).endswith(f"did you mean {tmp_path / 'english.txt'}?")
    with pytest.raises(DatasetError, match="dataset path is empty"):
        load_texts(" ")
    with pytest.raises(DatasetError, match="no such file"):  # a missing owner/name.txt: local
        load_texts("owner/name.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError) as error:  # the path as given, not its last name alone
        load_texts(tmp_path / "empty")
    assert str(error.value).startswith(f"{tmp_path / 'empty'}: holds no .parquet, .jsonl or .txt")


def test_device_behind_a_txt_name_is_not_read(tmp_path):
    """A link named .txt to /dev/zero: one line, not a read that fills the memory."""
    link = tmp_path / "zero.txt"
    link.symlink_to("/dev/zero")
    with pytest.raises(DatasetError) as error:
        load_texts(link)
    assert "not a regular file (a device, pipe or socket)" in _one_line(error)


def test_unreadable_file(tmp_path):
    path = tmp_path / "secret.txt"
    path.write_text("text")
    path.chmod(0)
    if os.access(path, os.R_OK):  # running as root: permissions do not apply
        pytest.skip("root reads files without read permission")
    with pytest.raises(DatasetError) as error:
        load_texts(path)
    assert "cannot read the file (Permission denied)" in _one_line(error)


def test_dataset_error_is_a_kiln_error():
    assert issubclass(DatasetError, KilnError)


def test_hub_dataset(tmp_path, monkeypatch):
    snapshot = tmp_path / "snapshots" / "0123abcd"
    (snapshot / "data").mkdir(parents=True)
    pq.write_table(pa.table({"text": ["x", "y"]}), snapshot / "data" / "test-00000.parquet")
    (snapshot / "README.txt").write_text("not read: parquet comes first")
    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(snapshot)

    import huggingface_hub
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.chdir(tmp_path)
    data = load_texts("owner/name")
    assert data == TextDataset(texts=("x", "y"), name="owner/name", sha256="0123abcd", kind="hub")
    assert calls == [("owner/name", {"repo_type": "dataset", "etag_timeout": datasets.HUB_TIMEOUT_S,
                                     "allow_patterns": ["*.parquet", "*.jsonl", "*.txt"]})]
    calls.clear()
    assert load_texts("owner/name:data/test-*").name == "owner/name:data/test-*"
    assert calls[0][1]["allow_patterns"] == ["data/test-*"]


@pytest.mark.parametrize(("offline", "why"), [
    ("1", "offline (HF_HUB_OFFLINE is set) and it is not in the local cache"),
    ("0", "the hub is unreachable and it is not in the local cache"),
])
def test_hub_offline(tmp_path, monkeypatch, offline, why):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline_download(repo_id, **kwargs):
        raise LocalEntryNotFoundError("Cannot find an appropriate cached snapshot folder")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline_download)
    monkeypatch.setenv("HF_HUB_OFFLINE", offline)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DatasetError) as error:
        load_texts("owner/name")
    message = _one_line(error)
    assert message.startswith("dataset owner/name: no such local path, and the hub cannot "
                              "provide it: ") and why in message and "pass the file" in message


def test_hub_not_found(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import RepositoryNotFoundError

    def missing(repo_id, **kwargs):
        error = RepositoryNotFoundError.__new__(RepositoryNotFoundError)  # no HTTP response here
        Exception.__init__(error, "404 Client Error.\nRepository Not Found")
        raise error

    monkeypatch.setattr(huggingface_hub, "snapshot_download", missing)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DatasetError) as error:
        load_texts("owner/name")
    assert "the hub has no such dataset (or it is private)" in _one_line(error)


def test_local_path_wins_over_hub_id(tmp_path, monkeypatch):
    (tmp_path / "owner").mkdir()
    (tmp_path / "owner" / "name").mkdir()
    (tmp_path / "owner" / "name" / "a.txt").write_text("local")
    monkeypatch.chdir(tmp_path)
    assert load_texts("owner/name").texts == ("local",)


def test_a_path_under_an_unknown_users_home_is_named_as_given():
    """``Path.expanduser``'s RuntimeError for ``~nouser`` had leaked (kiln.dirs.expand_home)."""
    with pytest.raises(DatasetError, match=r"^calib_dataset='~nouser/x' starts with ~nouser, "
                                           r"but there is no user nouser; give another path$"):
        load_texts("~nouser/x", "calib_dataset")


def test_a_file_s_path_with_a_trailing_slash_is_refused(tmp_path):
    """A retest's kiln quantize --eval_dataset english.txt/ had read the file (pathlib drops the
    '/'); cat says "Not a directory"."""
    (tmp_path / "english.txt").write_text("Some text.")
    for given in (f"{tmp_path}/english.txt/", f"{tmp_path}/english.txt/."):  # (retest 44c)
        with pytest.raises(DatasetError) as error:
            load_texts(given)
        assert _one_line(error) == (f"{given}: treats {tmp_path}/english.txt as a directory (a "
                                    f"'/' after it), and it is a file; give the file's path, "
                                    f"{tmp_path}/english.txt")
    assert load_texts(f"{tmp_path}/").texts == ("Some text.",)  # a directory's '/' is fine
