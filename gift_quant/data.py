"""Text sources and token windows.

Named sources resolve from a local data folder first (recipe `data.dir`, else $GIFT_QUANT_DATA), holding files named
as in the project's shared data, and otherwise from the Hugging Face Hub through `datasets`:

| name      | local file            | Hub                                                    | use                  |
|-----------|-----------------------|--------------------------------------------------------|----------------------|
| wikitext2 | wikitext2_test.raw    | wikitext / wikitext-2-raw-v1, split test               | evaluation only      |
| c4        | c4_sample.jsonl       | allenai/c4, shard en/c4-train.00000-of-01024           | calibration/training |

Any other source is a local `.txt` (one document) / `.jsonl` (one document per line, `text_field`) file, or
`hf:<dataset>[:<config>]` for a generic Hub dataset.
"""

from __future__ import annotations

import json
import logging
import os
import random
from pathlib import Path

import torch

from .config import TextSource
from .errors import UserError

log = logging.getLogger(__name__)

LOCAL_FILES = {"wikitext2": "wikitext2_test.raw", "c4": "c4_sample.jsonl"}
EVAL_ONLY = {"wikitext2"}


def data_dir(configured: Path | None = None) -> Path | None:
    chosen = configured or os.environ.get("GIFT_QUANT_DATA")
    if chosen is None:
        return None
    path = Path(chosen).expanduser()
    if not path.is_dir():
        raise UserError(f"data folder not found: {path} (set data.dir or GIFT_QUANT_DATA to the folder holding "
                        f"{' and '.join(LOCAL_FILES.values())})")
    return path


def load_documents(source: TextSource, folder: Path | None = None) -> list[str]:
    """The documents of a source, in order."""
    path = local_path(source, folder)
    return _read_hub(source.dataset, source) if path is None else _read_local(path, source.text_field)


def local_path(source: TextSource, folder: Path | None = None) -> Path | None:
    """The local file a source reads, or None when it comes from the Hub; a missing local file is a UserError, so
    calling this before any work (the runner's preflight) catches it early."""
    name = source.dataset
    if name in LOCAL_FILES:
        local = data_dir(folder)
        if local is None:
            return None
        path = local / LOCAL_FILES[name]
        if not path.is_file():
            raise UserError(f"missing data file {path}; put {LOCAL_FILES[name]} there or unset the data folder "
                            f"to use the Hub")
        return path
    if name.startswith("hf:"):
        return None
    path = Path(name).expanduser()
    if path.suffix in (".txt", ".jsonl", ".raw") and path.is_file():
        return path
    raise UserError(f"unknown data source '{name}': use wikitext2, c4, an existing .txt/.jsonl file, or "
                    f"hf:<dataset>[:<config>]")


def _read_local(path: Path, text_field: str) -> list[str]:
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start}); convert the file to UTF-8") from None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    if path.suffix == ".jsonl":
        return [_jsonl_text(line, text_field, f"{path}:{n}") for n, line in enumerate(text.split("\n"), 1)
                if line.strip()]
    if path.suffix == ".raw":  # WikiText raw: one paragraph or heading per non-empty line
        return [ln for ln in text.replace("\r", "").split("\n") if ln.strip()]
    return [text]


def _jsonl_text(line: str, text_field: str, where: str) -> str:
    try:
        value = json.loads(line)[text_field]
    except (json.JSONDecodeError, KeyError, TypeError, RecursionError):
        raise UserError(f"{where}: not a JSON object with a '{text_field}' field") from None
    if not isinstance(value, str):
        raise UserError(f"{where}: '{text_field}' is a {type(value).__name__}, not a string")
    return value


def _read_hub(name: str, source: TextSource) -> list[str]:
    import datasets

    if name == "wikitext2":
        args, kwargs, split = ("wikitext", "wikitext-2-raw-v1"), {}, "test"
    elif name == "c4":
        args = ("allenai/c4",)
        kwargs, split = {"data_files": {"train": "en/c4-train.00000-of-01024.json.gz"}}, "train"
    else:
        path, _, config = name[3:].partition(":")
        args, kwargs, split = ((path, config) if config else (path,)), {}, "train"
    try:
        ds = datasets.load_dataset(*args, split=source.split or split, **kwargs)
    except Exception as e:  # datasets raises many types for offline/missing; all mean "cannot get it"
        raise UserError(f"cannot load dataset '{name}' from the Hub ({type(e).__name__}); set GIFT_QUANT_DATA to a "
                        f"local data folder or check network access") from e
    texts = [t.rstrip("\n") for t in ds[source.text_field]]
    return [t for t in texts if t.strip()] if name == "wikitext2" else texts


def encode(tokenizer, text: str, **kwargs):
    """``tokenizer(text)``, with the tokenizers library's bare ``Exception`` (a tokenizer without an unknown token
    meeting a character outside its vocabulary) turned into one line."""
    try:
        return tokenizer(text, **kwargs)
    except Exception as e:  # noqa: BLE001 (tokenizers raises plain Exception)
        raise UserError(f"the tokenizer cannot encode the text: {' '.join(str(e).split())} (it has no unknown token "
                        f"for characters outside its vocabulary; use the model's own tokenizer or clean the text)"
                        ) from e


def evaluation_ids(tokenizer, docs: list[str]) -> torch.Tensor:
    """GPTQ protocol: documents joined with blank lines, tokenized once. Shape (1, N)."""
    return encode(tokenizer, "\n\n".join(docs), return_tensors="pt").input_ids


def calibration_windows(tokenizer, docs: list[str], num_samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """GPTQ convention: each sample is a random `seq_len` window of a random document longer than `seq_len`.

    Where no document is that long, windows are cut from the documents' concatenation instead (logged).
    Reproducible for a given seed. Shape (num_samples, seq_len).
    """
    rng = random.Random(seed)
    encoded = [encode(tokenizer, d).input_ids for d in docs]
    long_docs = [ids for ids in encoded if len(ids) > seq_len]
    if not long_docs:
        sep = encode(tokenizer, "\n\n").input_ids
        stream = [t for ids in encoded for t in ids + sep]
        if len(stream) <= seq_len:
            raise UserError(f"calibration text has {len(stream)} tokens, fewer than one window of {seq_len}")
        log.info("no document exceeds %d tokens; sampling windows from the concatenated text", seq_len)
        long_docs = [stream]
    windows = []
    for _ in range(num_samples):
        ids = long_docs[rng.randrange(len(long_docs))]
        start = rng.randrange(len(ids) - seq_len)
        windows.append(ids[start : start + seq_len])
    return torch.tensor(windows, dtype=torch.long)


def packed_sequences(tokenizer, docs: list[str], seq_len: int, max_sequences: int | None = None) -> torch.Tensor:
    """Training text: documents joined with EOS and cut into consecutive `seq_len` blocks (the tail is dropped)."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream: list[int] = []
    limit = None if max_sequences is None else max_sequences * seq_len
    for d in docs:
        stream.extend(encode(tokenizer, d).input_ids + eos)
        if limit is not None and len(stream) >= limit:
            break
    n = len(stream) // seq_len if limit is None else min(len(stream) // seq_len, max_sequences)
    if n == 0:
        raise UserError(f"training text has {len(stream)} tokens, fewer than one sequence of {seq_len}")
    return torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)


def source_label(name: str) -> str:
    """Short name of a source for metric names: wikitext2, c4, a file's stem, a Hub dataset's name."""
    if name.startswith("hf:"):
        return name[3:].split(":")[0].rsplit("/", 1)[-1]
    return Path(name).stem if name not in LOCAL_FILES else name


def check_not_eval_text(source: TextSource, purpose: str) -> None:
    if source.dataset in EVAL_ONLY:
        raise UserError(f"'{source.dataset}' is evaluation text; use c4 or another source for {purpose}")
