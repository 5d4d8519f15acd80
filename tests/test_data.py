import json
import re

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from edgezo.bundle import TokenizerSpec
from edgezo.data import IGNORE, BatchStream, collate, read_jsonl, split_holdout, tokenize
from edgezo.errors import DataError


@pytest.fixture(scope="module")
def tok():
    vocab = {"<pad>": 0, "<eos>": 1, "[UNK]": 2}
    for w in "a b c d hello world the cat sat on mat q : answer".split():
        vocab.setdefault(w, len(vocab))
    t = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    return t


SPEC = TokenizerSpec(pad_token_id=0, eos_token_id=1)


def write(tmp_path, lines, name="d.jsonl"):
    p = tmp_path / name
    p.write_text("\n".join(lines) + "\n")
    return p


def test_text_and_prompt_completion(tmp_path, tok):
    p = write(
        tmp_path,
        [
            json.dumps({"text": "the cat sat"}),
            json.dumps({"prompt": "q :", "completion": "answer"}),
        ],
    )
    ex = tokenize(read_jsonl(p), tok, SPEC, max_length=16)
    assert ex[0].labels == ex[0].input_ids  # loss on every token, eos included
    assert ex[0].input_ids[-1] == 1
    assert ex[1].labels[:2] == (IGNORE, IGNORE)  # prompt masked
    assert ex[1].labels[2:] == ex[1].input_ids[2:]
    batch = collate(ex, pad_id=0)
    assert batch["input_ids"].dtype == np.int64
    assert batch["attention_mask"].sum(1).tolist() == [4, 4]


def test_padding_is_masked(tmp_path, tok):
    p = write(tmp_path, [json.dumps({"text": "a"}), json.dumps({"text": "a b c d"})])
    b = collate(tokenize(read_jsonl(p), tok, SPEC, 16), pad_id=0)
    assert b["attention_mask"][0].tolist() == [1, 1, 0, 0, 0]
    assert b["labels"][0].tolist()[2:] == [IGNORE] * 3


@pytest.mark.parametrize(
    "line,match",
    [
        ("{not json", r"d\.jsonl:2 is not valid JSON"),
        ("[1, 2]", r"d\.jsonl:2 is a JSON list"),
        ('{"body": "x"}', r'd\.jsonl:2 has neither "text" nor "prompt"\+"completion"'),
        ('{"text": 3}', r'd\.jsonl:2: "text" must be a string'),
    ],
)
def test_bad_lines_name_file_and_line(tmp_path, tok, line, match):
    p = write(tmp_path, [json.dumps({"text": "a"}), line])
    with pytest.raises(DataError, match=match):
        read_jsonl(p)


def test_empty_and_missing_files(tmp_path):
    with pytest.raises(DataError, match="holds no examples"):
        read_jsonl(write(tmp_path, ["", "  "]))
    with pytest.raises(DataError, match="does not exist"):
        read_jsonl(tmp_path / "nope.jsonl")


def test_all_labels_masked_after_truncation(tmp_path, tok):
    p = write(tmp_path, [json.dumps({"prompt": "a b c d a b", "completion": "cat"})])
    with pytest.raises(DataError, match=r"d\.jsonl:1: no token left to learn from"):
        tokenize(read_jsonl(p), tok, SPEC, max_length=4, where=str(p))


def test_holdout_split_is_seeded_and_needs_enough_examples(tmp_path, tok):
    p = write(tmp_path, [json.dumps({"text": "a " * (i % 3 + 1)}) for i in range(10)])
    ex = tokenize(read_jsonl(p), tok, SPEC, 8)
    tr, he = split_holdout(ex, 0.2, seed=1)
    assert len(he) == 2 and len(tr) == 8
    assert split_holdout(ex, 0.2, seed=1) == (tr, he)
    with pytest.raises(DataError, match="too few"):
        split_holdout(ex[:1], 0.2, seed=1)


def test_batch_stream_is_a_pure_function_of_step(tmp_path, tok):
    p = write(tmp_path, [json.dumps({"text": "a " * (i % 4 + 1)}) for i in range(7)])
    ex = tokenize(read_jsonl(p), tok, SPEC, 8)
    s1, s2 = BatchStream(ex, 3, seed=4, pad_id=0), BatchStream(ex, 3, seed=4, pad_id=0)
    seq = [s1.indices(t) for t in range(10)]
    assert [s2.indices(t) for t in reversed(range(10))][::-1] == seq
    # every epoch is a permutation: the first 7 positions cover all examples once
    flat = [i for b in seq for i in b]
    assert sorted(flat[:7]) == list(range(7))


@pytest.mark.parametrize(
    "raw,match,fix",
    [
        (b'{"text": "caf\xe9"}\n', r"d\.jsonl:2: byte 14 of the line is not UTF-8", "UTF-8"),
        (
            b'{"text": "a\tb"}\n',
            r"d\.jsonl:2 is not valid JSON: Invalid control character at column 12",
            r"\\t",
        ),
        (b'{"text": "open\n', r"d\.jsonl:2 is not valid JSON: .* column \d+", "one line"),
        (b'{"text": "x", }\n', r"d\.jsonl:2 is not valid JSON: .* at column 15", "one JSON object"),
        (b"[" * 100_000 + b"\n", r"d\.jsonl:2 nests its JSON too deeply", "flat"),
        (b'"just a string"\n', r"d\.jsonl:2 is a JSON string, not an object", "one JSON object"),
        (b'{"text": null}\n', r'd\.jsonl:2: "text" must be a string, got a JSON null', "quote"),
        (b'{"prompt": 3, "completion": "x"}\n', r'"prompt" is a JSON number', "prompt"),
    ],
)
def test_every_bad_line_names_line_column_and_fix(tmp_path, raw, match, fix):
    p = tmp_path / "d.jsonl"
    p.write_bytes(b'{"text": "fine"}\n' + raw)
    with pytest.raises(DataError, match=match) as e:
        read_jsonl(p)
    assert re.search(fix, e.value.fix), e.value.fix


def test_a_utf8_bom_is_fine(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_bytes(b'\xef\xbb\xbf{"text": "bom"}\n')
    assert read_jsonl(p) == [(1, {"text": "bom"})]
