"""offload.data: reading records, encoding them with a real (offline-trained) tokenizer, the token cache, and the
packed training batches."""

import errno
import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from offload.data import Encoder, PackedBlocks, TokenizedData, kind_of, read_records, tokenize
from offload.errors import ConfigError

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import hf_model_dir  # noqa: E402

CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What does she repair?"},
                {"role": "assistant", "content": "Clocks and radios."}, {"role": "user", "content": "And?"},
                {"role": "assistant", "content": "Bicycles, on slow afternoons."}]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tokenizer")
    hf_model_dir.save_tokenizer(out)
    return out


@pytest.fixture
def tokenizer(tokenizer_dir):
    """A fresh copy per test, so that a test may change it."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def encode_one(encoder: Encoder, path: Path):
    (encoded,) = encoder.encode(list(read_records(path)))
    return encoded


def tokenized(path, encoder, tmp_path, cache=True) -> TokenizedData:
    scratch = tmp_path / "scratch"
    scratch.mkdir(exist_ok=True)
    return tokenize(path, encoder, tmp_path / "cache" if cache else None, scratch_dir=scratch, progress=False)


# --- records -------------------------------------------------------------------------------------------------

def test_txt_paragraph_mode_splits_at_blank_lines(tmp_path):
    path = tmp_path / "doc.txt"
    path.write_text("first line\nsame paragraph\n\n  \nsecond paragraph\n\n\nthird\n")
    records = list(read_records(path))
    assert [r.fields for r in records] == [{"text": "first line\nsame paragraph"}, {"text": "second paragraph"},
                                           {"text": "third"}]
    assert [r.where for r in records] == [f"{path}:1", f"{path}:5", f"{path}:8"]
    assert read_records(path).txt_mode == "paragraph"


def test_txt_line_mode_without_blank_lines_between_text(tmp_path):
    path = tmp_path / "lines.txt"
    path.write_text("one\ntwo\r\nthree\n\n")  # a blank line only at the end keeps line mode
    stream = read_records(path)
    assert stream.txt_mode == "line"
    assert [r.fields["text"] for r in stream] == ["one", "two", "three"]
    assert stream.done == path.stat().st_size


def test_jsonl_bad_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n\n{"text": oops}\n')
    with pytest.raises(ConfigError, match=rf"^{path}:3: not a JSON object \(") as info:
        list(read_records(path))
    assert "\n" not in str(info.value)
    path.write_text('{"text": "ok"}\n[1, 2]\n')
    with pytest.raises(ConfigError, match=rf"^{path}:2: not a JSON object \(found a JSON array\)"):
        list(read_records(path))


def test_missing_and_wrongly_typed_fields_are_named(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "fine"}, {"question": "q", "answer": "a"}])
    first, second = read_records(path)
    assert kind_of(first) == "text"
    with pytest.raises(ConfigError, match=rf"^{path}:2: expected a 'text' field, 'prompt' and 'completion', or "
                                          r"'messages'; found keys: question, answer$"):
        kind_of(second)
    path = write_jsonl(tmp_path / "types.jsonl", [{"prompt": "p", "completion": 3},
                                                  {"messages": [{"role": "user", "content": None}]},
                                                  {"prompt": "p"}])
    wrong_completion, wrong_content, lone_prompt = read_records(path)
    with pytest.raises(ConfigError, match=rf"^{path}:1: field 'completion' must be a string, found int$"):
        kind_of(wrong_completion)
    with pytest.raises(ConfigError, match=rf"^{path}:2: field 'messages\[0\].content' must be a string, found null"):
        kind_of(wrong_content)
    with pytest.raises(ConfigError, match=rf"^{path}:3: .*'completion' is missing \(found keys: prompt\)"):
        kind_of(lone_prompt)


def test_unknown_suffix_and_missing_path(tmp_path):
    path = tmp_path / "table.csv"
    path.write_text("a,b\n")
    with pytest.raises(ConfigError, match=r"table\.csv has the suffix '\.csv'; accepted: \.txt, \.jsonl, \.json, "
                                          r"\.parquet"):
        read_records(path)
    with pytest.raises(OSError) as info:
        read_records(tmp_path / "nowhere.jsonl")
    assert info.value.errno == errno.ENOENT and "nowhere.jsonl" in str(info.value)
    (tmp_path / "plain_dir").mkdir()
    with pytest.raises(ConfigError, match="not one written by datasets' save_to_disk"):
        read_records(tmp_path / "plain_dir")


# --- encoding ------------------------------------------------------------------------------------------------

def test_text_is_tokenized_with_eos_and_fully_trained(tmp_path, tokenizer):
    text = "The woman who keeps it repairs clocks."
    encoded = encode_one(Encoder(tokenizer), write_jsonl(tmp_path / "t.jsonl", [{"text": text}]))
    assert encoded.kind == "text"
    assert encoded.ids.tolist() == tokenizer(text).input_ids + [tokenizer.eos_token_id]
    assert encoded.trained.all()
    # a text that already ends with the end-of-sequence token gets no second one
    encoded = encode_one(Encoder(tokenizer), write_jsonl(tmp_path / "e.jsonl", [{"text": text + "</s>"}]))
    assert encoded.ids.tolist() == tokenizer(text + "</s>").input_ids


def test_prompt_completion_trains_the_completion_and_eos_only(tmp_path, tokenizer):
    prompt, completion = "Where is the workshop?", " At the edge of the town."
    path = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": prompt, "completion": completion, "id": 7}])
    encoded = encode_one(Encoder(tokenizer), path)
    prompt_ids = tokenizer(prompt, add_special_tokens=True).input_ids
    completion_ids = tokenizer(completion, add_special_tokens=False).input_ids
    assert encoded.kind == "prompt_completion"
    assert encoded.ids.tolist() == prompt_ids + completion_ids + [tokenizer.eos_token_id]
    assert encoded.trained.tolist() == [False] * len(prompt_ids) + [True] * (len(completion_ids) + 1)


def test_messages_train_exactly_the_assistant_turns(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}])
    encoded = encode_one(Encoder(tokenizer), path)
    full = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert encoded.ids.tolist() == tokenizer(full, add_special_tokens=False).input_ids  # no extra eos
    # the trained tokens are two runs: each assistant answer with its "</s>\n" turn end, nothing else
    runs, run = [], []
    for token, trained in zip(encoded.ids.tolist(), encoded.trained.tolist()):
        if trained:
            run.append(token)
        elif run:
            runs.append(run)
            run = []
    runs += [run] if run else []
    assert [tokenizer.decode(r) for r in runs] == ["Clocks and radios.</s>\n", "Bicycles, on slow afternoons.</s>\n"]
    untrained = tokenizer.decode(encoded.ids[~encoded.trained])
    assert "Be brief." in untrained and "What does she repair?" in untrained and "<|assistant|>" in untrained


def test_messages_need_a_chat_template_that_renders_prefixes(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"text": "plain"}, {"messages": CONVERSATION}])
    with pytest.raises(ConfigError, match=rf"^{path}:2: 'messages' needs a model with a tokenizer"):
        Encoder(None).encode(list(read_records(path)))
    tokenizer.chat_template = None
    with pytest.raises(ConfigError, match=rf"^{path}:2: 'messages' needs a tokenizer with a chat template; "
                                          rf"{tokenizer_name(tokenizer)}'s tokenizer has none$"):
        Encoder(tokenizer).encode(list(read_records(path)))
    # a template that marks the last turn renders a conversation differently from its prefixes
    tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}"
                               "{% if loop.last %} [end]{% endif %}\n{% endfor %}")
    with pytest.raises(ConfigError, match=rf"^{path}:2: .*does not render a prefix of the conversation as a "
                                          r"prefix of its rendering, so the assistant turns cannot be located$"):
        Encoder(tokenizer).encode(list(read_records(path)))


def tokenizer_name(tokenizer) -> str:
    return str(tokenizer.name_or_path).replace("/", r"\/").replace(".", r"\.")


def test_byte_encoder(tmp_path):
    path = write_jsonl(tmp_path / "b.jsonl", [{"text": "hé"}, {"prompt": "ab", "completion": "c"}])
    text, pair = Encoder(None).encode(list(read_records(path)))
    assert text.ids.tolist() == list("hé".encode()) + [10, 10] and text.trained.all()
    assert pair.ids.tolist() == [97, 98, 99, 10, 10] and pair.trained.tolist() == [False, False, True, True, True]
    assert Encoder(None).fingerprint == "bytes" and Encoder(None).vocab_size == 256


def test_tokenizer_without_eos_warns_once_and_appends_nothing(tmp_path, tokenizer, caplog):
    tokenizer.eos_token = None
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "one"}, {"text": "two"}])
    encoder = Encoder(tokenizer)
    with caplog.at_level(logging.WARNING, logger="offload"):
        first, second = encoder.encode(list(read_records(path)))
        encoder.encode(list(read_records(path)))
    assert first.ids.tolist() == tokenizer("one").input_ids and second.ids.tolist() == tokenizer("two").input_ids
    assert sum("no end-of-sequence token" in r.message for r in caplog.records) == 1


# --- the token cache -----------------------------------------------------------------------------------------

class CountingEncoder(Encoder):
    """An Encoder that counts the records it encodes."""

    def __init__(self, tokenizer=None):
        super().__init__(tokenizer)
        self.encoded = 0

    def encode(self, records):
        self.encoded += len(records)
        return super().encode(records)


def test_cache_is_reused_then_invalidated_when_the_file_changes(tmp_path, tokenizer, caplog):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": f"document {i}"} for i in range(50)]
                       + [{"prompt": "p", "completion": "c"}])
    encoder = CountingEncoder(tokenizer)
    first = tokenized(path, encoder, tmp_path)
    assert encoder.encoded == 51 and not first.from_cache
    assert first.records == {"text": 50, "prompt_completion": 1}
    assert first.describe() == (f"51 records, {first.num_tokens:,} tokens ({first.num_trained:,} trained) from "
                                f"{path}, cached in {tmp_path / 'cache'}")
    with caplog.at_level(logging.INFO, logger="offload"):
        second = tokenized(path, encoder, tmp_path)
    assert encoder.encoded == 51, "the second call must not tokenize"
    assert second.from_cache and second.describe().endswith(f"read from cache {tmp_path / 'cache'}")
    assert any("not tokenized again" in r.message for r in caplog.records)
    assert second.fingerprint == first.fingerprint
    assert np.array_equal(second.ids, first.ids) and np.array_equal(second.mask, first.mask)
    assert not second.ids.flags.writeable

    write_jsonl(path, [{"text": "a changed file"}])
    third = tokenized(path, encoder, tmp_path)
    assert encoder.encoded == 52 and not third.from_cache and third.fingerprint != first.fingerprint
    # the cache of the file's earlier version is gone; nothing temporary is left
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted(
        f"{third.fingerprint}{suffix}" for suffix in (".ids", ".mask", ".meta.json"))
    # another encoder is another key
    assert tokenized(path, Encoder(None), tmp_path).fingerprint != third.fingerprint


def test_incomplete_cache_is_rebuilt(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "some text"}])
    encoder = CountingEncoder()
    first = tokenized(path, encoder, tmp_path)
    ids_file = tmp_path / "cache" / f"{first.fingerprint}.ids"
    ids_file.write_bytes(ids_file.read_bytes()[:-4])  # as if cut short
    again = tokenized(path, encoder, tmp_path)
    assert encoder.encoded == 2 and not again.from_cache and again.num_tokens == first.num_tokens


def test_work_left_by_a_killed_run_is_removed_and_a_live_runs_is_kept(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "some text"}])
    cache = tmp_path / "cache"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (cache / f".tokenizing-{dead.pid}-abc").mkdir(parents=True)  # a pid that has exited
    (cache / f".tokenizing-{os.getppid()}-def").mkdir()  # a live process's
    tokenized(path, CountingEncoder(), tmp_path)
    assert sorted(p.name for p in cache.iterdir() if p.name.startswith(".tokenizing-")) == [
        f".tokenizing-{os.getppid()}-def"]


def test_unwritable_cache_dir_falls_back_to_scratch(tmp_path, caplog):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "hello"}, {"text": "world"}])
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    with caplog.at_level(logging.WARNING, logger="offload"):
        data = tokenize(path, Encoder(None), blocker / "cache", scratch_dir=scratch, progress=False)
    assert any("not writable" in r.message for r in caplog.records)
    assert data.cache_dir is None and data.describe().endswith(f"from {path}, not cached")
    assert bytes(np.asarray(data.ids, dtype=np.uint8)) == b"hello\n\nworld\n\n"
    assert list(scratch.iterdir()) == [], "scratch files are not kept"


def test_progress_logs_a_final_line_with_throughput(tmp_path, caplog):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "x" * 100}] * 30)
    with caplog.at_level(logging.INFO, logger="offload"):
        tokenize(path, Encoder(None), None, scratch_dir=tmp_path, batch_records=7, progress=True)
    assert any(r.message.startswith(f"tokenized {path}: 3,060 tokens in") and r.message.endswith("MB/s)")
               for r in caplog.records)


# --- packed blocks -------------------------------------------------------------------------------------------

@pytest.fixture
def packed_data(tmp_path) -> TokenizedData:
    """Byte-level prompt/completion pairs: 1350 tokens, 14 of each 27 untrained (each ends with a trained blank
    line)."""
    rows = [{"prompt": f"question {i:03d}? ", "completion": f"answer {i:03d}."} for i in range(50)]
    return tokenized(write_jsonl(tmp_path / "pairs.jsonl", rows), Encoder(None), tmp_path, cache=False)


def test_blocks_labels_are_ignored_exactly_where_untrained():
    data = counting_data(16 * 30)
    rng = np.random.default_rng(0)
    object.__setattr__(data, "mask", rng.integers(0, 2, data.num_tokens, dtype=np.uint8))
    blocks = PackedBlocks(data, seq_len=16)
    input_ids, labels = blocks.batch(3, 4, seed=1)
    assert input_ids.shape == labels.shape == (4, 16) and input_ids.dtype == labels.dtype == torch.int64
    for ids, lab in zip(input_ids, labels):
        start = int(ids[0])
        assert torch.equal(ids, torch.arange(start, start + 16))
        trained = torch.from_numpy(data.mask[start:start + 16].astype(bool))
        assert torch.equal(lab[trained], ids[trained]) and (lab[~trained] == -100).all()


def test_blocks_of_prompt_completion_pairs(packed_data):
    input_ids, labels = PackedBlocks(packed_data, seq_len=27).batch(0, 50, seed=0)
    expected = packed_data.ids.reshape(50, 27)
    assert sorted(map(tuple, input_ids.tolist())) == sorted(map(tuple, expected.tolist()))
    assert (labels[:, :14] == -100).all() and torch.equal(labels[:, 14:], input_ids[:, 14:])


def counting_data(num_tokens: int) -> TokenizedData:
    """Token ids 0, 1, 2, ...: a block is known by its first id."""
    return TokenizedData(ids=np.arange(num_tokens, dtype=np.uint32), mask=np.ones(num_tokens, dtype=np.uint8),
                         num_tokens=num_tokens, num_trained=num_tokens, records={"text": 1}, source="counting",
                         fingerprint="counting", content="counting", cache_dir=None)


def test_blocks_are_deterministic_and_cover_each_block_once_per_epoch():
    data = counting_data(10 * 40 + 3)  # 40 blocks; the last 3 tokens are dropped
    blocks = PackedBlocks(data, seq_len=10)
    n = blocks.num_blocks
    assert n == 40

    def order(size, seed, batches):
        return [int(row[0]) // 10 for i in range(batches) for row in blocks.batch(i, size, seed)[0]]

    size = 7  # does not divide num_blocks: batches straddle epochs
    seen = order(size, seed=5, batches=(3 * n) // size + 1)
    for epoch in range(3):
        assert sorted(seen[epoch * n:(epoch + 1) * n]) == list(range(n))
    assert seen[:n] != seen[n:2 * n], "each epoch has its own order"
    assert seen == order(size, seed=5, batches=(3 * n) // size + 1)  # a pure function of (seed, index)
    assert seen[:n] != order(size, seed=6, batches=n // size + 1)[:n]
    assert order(1, seed=5, batches=2 * n) == seen[:2 * n], "the order does not depend on the batch size"
    assert order(2 * n + 5, seed=5, batches=1) == seen[:2 * n + 5]  # a batch larger than an epoch
    assert torch.equal(blocks.batch(9, size, 5)[0], PackedBlocks(data, 10).batch(9, size, 5)[0])


def test_eval_batches_and_short_data(packed_data, tmp_path):
    blocks = PackedBlocks(packed_data, seq_len=100)
    batches = list(blocks.eval_batches(5))
    assert [b[0].shape[0] for b in batches] == [5, 5, 3]
    assert torch.equal(torch.cat([b[0] for b in batches]).flatten(),
                       torch.from_numpy(np.array(packed_data.ids[:1300], dtype=np.int64)))
    with pytest.raises(ConfigError, match=rf"^--data: {packed_data.source} has 1,350 tokens, fewer than one "
                                          r"sequence of --seq-len 2048$"):
        PackedBlocks(packed_data, 2048)
    with pytest.raises(ConfigError, match=r"^--eval-data: .* fewer than one sequence"):
        PackedBlocks(packed_data, 2048, flag="--eval-data")


# --- datasets sources ----------------------------------------------------------------------------------------

def test_parquet_and_save_to_disk(tmp_path, tokenizer):
    datasets = pytest.importorskip("datasets", reason="reading parquet and dataset directories needs datasets")
    rows = {"prompt": ["Q1 ", "Q2 "], "completion": ["A1", "A2"], "score": [0.5, 0.7]}
    ds = datasets.Dataset.from_dict(rows)
    ds.to_parquet(tmp_path / "d.parquet")
    ds.save_to_disk(tmp_path / "saved")
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(tmp_path / "splits")
    for source in ("d.parquet", "saved", "splits"):
        records = list(read_records(tmp_path / source))
        assert [r.fields for r in records] == [{"prompt": "Q1 ", "completion": "A1", "score": 0.5},
                                               {"prompt": "Q2 ", "completion": "A2", "score": 0.7}]
        assert records[1].where == f"{tmp_path / source}:row 1"
    data = tokenized(tmp_path / "saved", Encoder(tokenizer), tmp_path)
    assert data.records == {"prompt_completion": 2}
    assert tokenized(tmp_path / "saved", Encoder(tokenizer), tmp_path).from_cache


def test_datasets_missing_gives_a_clear_error(tmp_path, monkeypatch):
    (tmp_path / "saved").mkdir()
    (tmp_path / "saved" / "state.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ConfigError, match=rf"^--data: reading {tmp_path / 'saved'} needs the datasets library: "
                                          r"pip install 'offload\[datasets\]'$"):
        list(read_records(tmp_path / "saved"))


# --- bounded memory ------------------------------------------------------------------------------------------

MEMORY_CHILD = textwrap.dedent("""
    import resource, sys, tempfile
    from pathlib import Path
    from transformers import AutoTokenizer
    from offload.data import Encoder, read_records, tokenize
    tokenizer = AutoTokenizer.from_pretrained(sys.argv[2])
    sample = Path(sys.argv[3])
    Encoder(tokenizer).encode(list(read_records(sample)))  # the baseline warms up the tokenizer too
    if sys.argv[1] == "run":
        with tempfile.TemporaryDirectory() as scratch:
            # bytes: 30 M tokens, which held in memory would alone exceed the bound; the tokenizer on a part
            data = tokenize(sys.argv[4], Encoder(None), None, scratch_dir=Path(scratch), progress=False)
            assert data.num_tokens > 28_000_000, data.num_tokens
            data = tokenize(sys.argv[5], Encoder(tokenizer), None, scratch_dir=Path(scratch), progress=False)
            assert data.num_tokens > 1_000_000, data.num_tokens
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
""")


@pytest.mark.slow
def test_tokenizing_keeps_memory_bounded(tmp_path, tokenizer_dir):
    words = " ".join(hf_model_dir.training_text()).split() * 2
    big, part = tmp_path / "big.jsonl", tmp_path / "part.jsonl"
    with open(big, "w") as f:
        for i in range(34_000):  # ~30 MB
            f.write(json.dumps({"text": " ".join(words[i % 997:i % 997 + 170])}) + "\n")
    with open(big, "rb") as f, open(part, "wb") as out:
        out.writelines(line for _, line in zip(range(4000), f))
    sample = write_jsonl(tmp_path / "sample.jsonl", [{"text": "warm up"}])
    assert big.stat().st_size > 28e6

    def peak(mode):
        result = subprocess.run([sys.executable, "-c", MEMORY_CHILD, mode, str(tokenizer_dir), str(sample),
                                 str(big), str(part)], capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        return int(result.stdout.split()[-1])

    growth = peak("run") - peak("baseline")
    assert growth < 100e6, f"tokenizing 30 MB grew the peak RSS by {growth / 1e6:.0f} MB"
