"""The one way models are saved: atomic, never deleting a directory that is not a saved model of its kind."""

import pytest

from v2flow.hub import staged_directory, write_text_atomic


def test_a_failed_save_leaves_the_old_directory_whole(tmp_path):
    target = tmp_path / "model"
    with staged_directory(target, marker="config.json") as staged:
        (staged / "config.json").write_text("old")
    with pytest.raises(RuntimeError, match="disk full"):
        with staged_directory(target, marker="config.json") as staged:
            (staged / "config.json").write_text("new")
            raise RuntimeError("disk full")
    assert (target / "config.json").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no staging directory left behind


def test_a_directory_of_other_files_is_never_replaced(tmp_path, tokenizer):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="holds files but no config.json"):
        tokenizer.save_pretrained(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    saved = tokenizer.save_pretrained(tmp_path / "tok")
    tokenizer.save_pretrained(saved)  # a saved tokenizer is replaced
    with pytest.raises(FileExistsError, match="pass overwrite=True"):
        with staged_directory(saved, marker="config.json", overwrite=False):
            pass
    with pytest.raises(FileExistsError, match="is a file"):
        tokenizer.save_pretrained(tmp_path / "notes.txt")


def test_atomic_text_write(tmp_path):
    path = write_text_atomic(tmp_path / "a" / "b.json", "{}\n")
    assert path.read_text() == "{}\n" and sorted(p.name for p in path.parent.iterdir()) == ["b.json"]
