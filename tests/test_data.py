import json

import pytest
import torch

from conftest import byte_tokenizer
from lmprune.data import calibration_windows, evaluation_windows, load_text, tokenize
from lmprune.errors import LmpruneError


def test_txt_and_jsonl_sources(tmp_path):
    (tmp_path / "a.txt").write_text("hello world")
    assert load_text(str(tmp_path / "a.txt")) == "hello world"
    lines = [json.dumps({"text": "first"}), "", json.dumps({"text": "second", "id": 2})]
    (tmp_path / "b.jsonl").write_text("\n".join(lines))
    assert load_text(str(tmp_path / "b.jsonl")) == "first\n\nsecond"


def test_jsonl_without_text_field_names_the_line(tmp_path):
    (tmp_path / "bad.jsonl").write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"body": "x"}) + "\n")
    with pytest.raises(LmpruneError, match=r"bad.jsonl:2: expected a JSON object with a \"text\" field"):
        load_text(str(tmp_path / "bad.jsonl"))


def test_named_dataset_unreachable_suggests_local_file(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_datasets(name, *args, **kwargs):
        if name == "datasets":
            raise ImportError("no datasets")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(LmpruneError, match="pass a local .txt or .jsonl file instead"):
        load_text("wikitext2")


def test_calibration_windows_are_seeded_and_in_range():
    ids = torch.arange(1000)
    a = calibration_windows(ids, 16, 64, seed=0)
    assert a.shape == (16, 64)
    assert torch.equal(a, calibration_windows(ids, 16, 64, seed=0))
    assert not torch.equal(a, calibration_windows(ids, 16, 64, seed=1))
    assert ((a[:, 1:] - a[:, :-1]) == 1).all()  # contiguous slices of the text


def test_calibration_needs_more_tokens_than_a_window():
    with pytest.raises(LmpruneError, match="calibration text too short: 64 tokens, need more than --seqlen 64"):
        calibration_windows(torch.arange(64), 4, 64, seed=0)


def test_evaluation_windows_consecutive_non_overlapping():
    ids = torch.arange(1000)
    w = evaluation_windows(ids, 100)
    assert w.shape == (10, 100) and torch.equal(w.reshape(-1), ids)
    assert evaluation_windows(ids, 300).shape == (3, 300)  # the tail is dropped
    assert evaluation_windows(ids, 100, max_windows=4).shape == (4, 100)
    with pytest.raises(LmpruneError, match="less than one 2000-token window"):
        evaluation_windows(ids, 2000)


def test_tokenize_whole_text_without_truncation():
    tokenizer = byte_tokenizer()
    ids = tokenize(tokenizer, "ab" * 5000)
    assert ids.dtype == torch.long and ids.numel() == 10000


@pytest.mark.parametrize("line, message", [
    ('{"text": broken', "not valid JSON (Expecting value at column 10)"),
    ('["a", "b"]', "expected a JSON object, not an array"),
    ('"just text"', "expected a JSON object, not a string"),
    ('{"text": 5}', "\"text\" must be a string, not a number"),
    ('{"text": ["a"]}', "\"text\" must be a string, not an array"),
    ('{"body": "x"}', "expected a JSON object with a \"text\" field"),
])
def test_a_bad_jsonl_line_is_named_by_its_number_in_the_file(tmp_path, line, message):
    # json.loads counts lines within the one line it is given: the message must count them in the file
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"text": "one"}) + "\n\n" + line + "\n" + json.dumps({"text": "four"}) + "\n")
    before = path.read_bytes()
    with pytest.raises(LmpruneError) as error:
        load_text(str(path))
    assert str(error.value) == f"{path}:3: {message}"
    assert path.read_bytes() == before
