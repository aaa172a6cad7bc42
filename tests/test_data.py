"""The data section: the nano world's mix or local files (text, JSON lines, parquet) read with `datasets`,
split into a train and a held-out part disjoint by content, packed into rows; bad rows named by file
and line."""

import gzip
import json

import pytest
import torch

from thinkfast.config import ConfigError
from thinkfast.data import Corpus, DataConfig, DataError, held_out
from thinkfast.nano.tokenizer import build_tokenizer
from thinkfast.pipeline import default_config_path, load_pipeline, stage_run
from thinkfast.rundir import RunDir

TOK = build_tokenizer()


def docs_of(rows: torch.Tensor) -> list[str]:
    """The whole documents inside nano rows (each row opens a document; the last one of a row is cut)."""
    out = []
    for row in rows.tolist():
        text = TOK.decode(row, skip_special_tokens=False)
        out += text.split(TOK.eos_token)[:-1]
    return out


def test_nano_split_is_disjoint_by_content_and_rows_are_pure_functions_of_their_key():
    c = Corpus(DataConfig(digits=[1], kinds=["add"], held_out=0.3), TOK)
    train, held = c.rows("train", "k", 6, 128), c.rows("held_out", "k", 6, 128)
    assert train.shape == held.shape == (6, 128)
    assert torch.equal(train, c.rows("train", "k", 6, 128)) and not torch.equal(train, c.rows("train", "k2", 6, 128))
    a, b = docs_of(train), docs_of(held)
    assert a and b and not set(a) & set(b)
    assert not any(held_out(d, 0.3) for d in a) and all(held_out(d, 0.3) for d in b)


def write_jsonl(path, rows, blank_after=()):
    lines = []
    for i, r in enumerate(rows):
        lines.append(r if isinstance(r, str) else json.dumps(r))
        if i in blank_after:
            lines.append("")
    path.write_text("\n".join(lines) + "\n")
    return path


def texts(n, prefix="doc"):
    return [{"text": f"{prefix} {i}: the quick brown fox jumps over the lazy dog {i * 7}.", "id": i} for i in range(n)]


def test_files_jsonl_text_and_parquet_split_by_content(tmp_path):
    import datasets

    a = write_jsonl(tmp_path / "a.jsonl", texts(60) + texts(5))  # 5 documents repeated: same side both times
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.write("\n".join(json.dumps(r) for r in texts(20, "gz")))
    (tmp_path / "c.txt").write_text("\n\n".join(f"paragraph {i}\nsecond line {i}" for i in range(30)))
    datasets.Dataset.from_list(texts(20, "pq")).to_parquet(str(tmp_path / "d.parquet"))
    cfg = DataConfig(files=[str(a), str(tmp_path / "b.jsonl.gz"), str(tmp_path / "c.txt"), str(tmp_path / "d.parquet")],
                     held_out=0.25)
    c = Corpus(cfg, TOK)
    assert c.documents("train") + c.documents("held_out") == 65 + 20 + 30 + 20
    rendered = {(fi, row): c._sets[fi][0][row][c._sets[fi][1]] for fi, row in c._index["train"] + c._index["held_out"]}
    train = {rendered[k] for k in c._index["train"]}
    held = {rendered[k] for k in c._index["held_out"]}
    assert train and held and not train & held
    assert "paragraph 3\nsecond line 3" in train | held  # a paragraph is one document
    rows = c.rows("train", "x", 4, 32)
    assert rows.shape == (4, 32) and torch.equal(rows, c.rows("train", "x", 4, 32))
    text = TOK.decode(c.rows("held_out", "y", 8, 64).flatten().tolist())
    assert any(h.split(":")[0] in text for h in held)


def test_text_units(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("one\ntwo\n\nthree\n")
    filler = write_jsonl(tmp_path / "filler.jsonl", texts(50))  # so that both parts have documents
    count = {}
    for unit in ("line", "paragraph", "document"):
        c = Corpus(DataConfig(files=[str(f), str(filler)], text_unit=unit), TOK)
        count[unit] = sum(fi == 0 for fi, _ in c._index["train"] + c._index["held_out"])
    assert count == {"line": 3, "paragraph": 2, "document": 1}


def test_chat_messages_are_rendered_with_the_parents_template(tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"what is {i} + {i}?"},
                          {"role": "assistant", "content": f"{2 * i}"}]} for i in range(40)]
    f = write_jsonl(tmp_path / "chat.jsonl", rows)
    c = Corpus(DataConfig(files=[str(f)], messages_field="messages", held_out=0.2), TOK)
    text = TOK.decode(c.rows("train", "k", 2, 64)[0].tolist())
    assert "<|start_header_id|>user<|end_header_id|>" in text and "<|eot_id|>" in text
    no_template = build_tokenizer()
    no_template.chat_template = None
    with pytest.raises(DataError, match="no chat template"):
        Corpus(DataConfig(files=[str(f)], messages_field="messages"), no_template)


@pytest.mark.parametrize("bad, blank_after, match", [
    ('{"text": "ok"', (), r"bad.jsonl line 5: not JSON"),
    ({"title": "no text"}, (), r"bad.jsonl line 5: field 'text' is missing or null"),
    ({"text": 3}, (), r"bad.jsonl line 5: field 'text' must be a string, got 3"),
    ({"text": "fine"}, (), None),
    ({"text": None}, (1, 2), r"bad.jsonl line 7: field 'text' is missing or null"),  # blank lines counted
])
def test_a_bad_json_row_is_named_by_file_and_line(tmp_path, bad, blank_after, match):
    f = write_jsonl(tmp_path / "bad.jsonl", texts(4) + [bad] + texts(3, "after"), blank_after)
    if match is None:
        Corpus(DataConfig(files=[str(f)], held_out=0.3), TOK)
        return
    with pytest.raises(DataError, match=match):
        Corpus(DataConfig(files=[str(f)], held_out=0.3), TOK)


def test_bad_messages_column_and_files(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "hi"}]}] * 3 + [{"messages": [{"role": "user"}]}]
    f = write_jsonl(tmp_path / "m.jsonl", rows)
    with pytest.raises(DataError, match=r"m.jsonl line 4: each message must have string 'role' and 'content'"):
        Corpus(DataConfig(files=[str(f)], messages_field="messages"), TOK)
    g = write_jsonl(tmp_path / "q.jsonl", [{"question": "x", "answer": "y"}] * 3)
    with pytest.raises(DataError, match=r"q.jsonl: no column 'text' \(columns: question, answer\); set data.text_field"):
        Corpus(DataConfig(files=[str(g)]), TOK)
    h = tmp_path / "latin1.txt"
    h.write_bytes("fine\nalso fine\n".encode() + "caf\xe9\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.txt line 3: not UTF-8"):
        Corpus(DataConfig(files=[str(h)]), TOK)
    with pytest.raises(DataError, match=r"nothing\*.jsonl matches no file"):
        Corpus(DataConfig(files=[str(tmp_path / "nothing*.jsonl")]), TOK)
    with pytest.raises(DataError, match="is a folder"):
        Corpus(DataConfig(files=[str(tmp_path)]), TOK)
    with pytest.raises(ValueError, match="unknown format"):
        DataConfig(files=["a.csv"])
    one = write_jsonl(tmp_path / "one.jsonl", texts(1))
    with pytest.raises(DataError, match="no document falls in the"):
        Corpus(DataConfig(files=[str(one)]), TOK)


def test_a_parquet_null_row_is_named(tmp_path):
    import datasets

    datasets.Dataset.from_list(texts(3) + [{"text": None, "id": 9}]).to_parquet(str(tmp_path / "p.parquet"))
    with pytest.raises(DataError, match=r"p.parquet row 4: field 'text' is missing or null"):
        Corpus(DataConfig(files=[str(tmp_path / "p.parquet")]), TOK)


def test_data_in_the_pipeline(tmp_path):
    f = write_jsonl(tmp_path / "t.jsonl", texts(40))
    smoke = default_config_path("smoke")
    with pytest.raises(ConfigError, match=r"override data.files=.*pretrain trains the nano parent.*parent stage"):
        load_pipeline(smoke, [f"data.files=[{f}]"])
    with pytest.raises(ConfigError, match=r"override data.files=.*missing\*.jsonl matches no file"):
        from thinkfast.pipeline import run_stage
        run_stage(load_pipeline(smoke, [f"run_dir={tmp_path / 'r'}", "stages=[parent,library]",
                                        f"parent.path={tmp_path}", f"data.files=[{tmp_path}/missing*.jsonl]"]),
                  "library")
    pipe = load_pipeline(smoke, [f"run_dir={tmp_path / 'r'}", "stages=[parent,library,scores]", f"parent.path={tmp_path}",
                                 f"data.files=[{f}]", "data.held_out=0.2"])
    with RunDir(pipe.run_dir) as rd:
        run, inputs, _ = stage_run(pipe, rd, "library")
    rec = run.record
    assert rec["config"]["data.held_out"] == 0.2 and "data.kinds" not in rec["config"]
    assert list(rec["inputs"]["data"].values())[0]["path"] == str(f.resolve())
    assert inputs.data.files == [str(f.resolve())]
    with RunDir(pipe.run_dir) as rd:
        assert "data" not in stage_run(pipe, rd, "parent")[0].record["inputs"]
