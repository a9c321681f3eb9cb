"""Text sources and token windows."""

from __future__ import annotations

import json

import pytest
import torch

from gift_quant.config import TextSource
from gift_quant.data import (calibration_windows, check_not_eval_text, evaluation_ids, load_documents,
                             packed_sequences)
from gift_quant.errors import UserError


def test_calibration_windows_are_seeded_slices_of_long_documents(char_tokenizer):
    docs = ["short", "x" * 10 + "".join(chr(65 + i % 26) for i in range(300)), "y" * 30]
    a = calibration_windows(char_tokenizer, docs, num_samples=20, seq_len=40, seed=3)
    b = calibration_windows(char_tokenizer, docs, num_samples=20, seq_len=40, seed=3)
    c = calibration_windows(char_tokenizer, docs, num_samples=20, seq_len=40, seed=4)
    assert a.shape == (20, 40) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    long_ids = char_tokenizer(docs[1]).input_ids
    for w in a.tolist():  # every window is a contiguous slice of the only document longer than seq_len
        starts = [i for i in range(len(long_ids) - 40 + 1) if long_ids[i : i + 40] == w]
        assert starts, w


def test_calibration_falls_back_to_concatenated_text(char_tokenizer):
    w = calibration_windows(char_tokenizer, ["abc", "defg", "hij"], num_samples=5, seq_len=8, seed=0)
    assert w.shape == (5, 8)
    with pytest.raises(UserError, match="fewer than one window"):
        calibration_windows(char_tokenizer, ["ab"], num_samples=1, seq_len=64, seed=0)


def test_packed_sequences_concatenate_with_eos(char_tokenizer):
    seqs = packed_sequences(char_tokenizer, ["abc", "de"], seq_len=3)
    assert seqs.tolist() == [[97, 98, 99], [256, 100, 101]]  # the trailing EOS is dropped with the tail
    assert packed_sequences(char_tokenizer, ["abcdefgh"] * 10, seq_len=3, max_sequences=4).shape == (4, 3)


def test_evaluation_text_is_joined_with_blank_lines(char_tokenizer):
    ids = evaluation_ids(char_tokenizer, ["ab", "c"])
    assert ids.tolist() == [[97, 98, 10, 10, 99]]


def test_local_sources(tmp_path):
    (tmp_path / "wikitext2_test.raw").write_bytes(b" = Title = \r\n line one \r\n\r\n line two \r\n")
    (tmp_path / "c4_sample.jsonl").write_text("\n".join(json.dumps({"text": t, "url": "u"}) for t in ["d1", "d2"]))
    assert load_documents(TextSource(dataset="wikitext2"), tmp_path) == [" = Title = ", " line one ", " line two "]
    assert load_documents(TextSource(dataset="c4"), tmp_path) == ["d1", "d2"]
    own = tmp_path / "mine.jsonl"
    own.write_text(json.dumps({"body": "x"}) + "\n")
    assert load_documents(TextSource(dataset=str(own), text_field="body"), None) == ["x"]
    with pytest.raises(UserError, match="'text' field"):
        load_documents(TextSource(dataset=str(own)), None)


def test_data_folder_from_environment(tmp_path, monkeypatch):
    (tmp_path / "c4_sample.jsonl").write_text(json.dumps({"text": "env"}) + "\n")
    monkeypatch.setenv("GIFT_QUANT_DATA", str(tmp_path))
    assert load_documents(TextSource(dataset="c4")) == ["env"]


def test_missing_data_is_a_user_error(tmp_path, monkeypatch, offline):
    with pytest.raises(UserError, match="missing data file"):
        load_documents(TextSource(dataset="c4"), tmp_path)
    with pytest.raises(UserError, match="data folder not found"):
        load_documents(TextSource(dataset="c4"), tmp_path / "absent")
    with pytest.raises(UserError, match="unknown data source"):
        load_documents(TextSource(dataset="nope"), tmp_path)
    monkeypatch.delenv("GIFT_QUANT_DATA", raising=False)
    with pytest.raises(UserError, match="cannot load dataset 'c4' from the Hub"):
        load_documents(TextSource(dataset="c4"))


def test_evaluation_text_cannot_train():
    with pytest.raises(UserError, match="evaluation text"):
        check_not_eval_text(TextSource(dataset="wikitext2"), "calibration")


def test_shared_files_follow_the_documented_convention(data_dir):
    docs = load_documents(TextSource(dataset="wikitext2"), data_dir)
    assert len(docs) == 2891 and all(d.strip() and "\r" not in d for d in docs)
    assert len(load_documents(TextSource(dataset="c4"), data_dir)) == 1000
