"""PAN-X / WikiAnn NER data: reader, embedded synthetic languages, tokenisation and batching.

File format (XTREME PAN-X): one ``lang:token<TAB>tag`` per line, a blank line between sentences,
tags from ``LABELS``. A language's splits are read from ``<root>/<lang>/<split>`` (the layout of
the extracted PAN-X archives) or ``<root>/<split>-<lang>.tsv``.

Without a data root, ``write_synthetic_panx`` generates a small multilingual tagging task
deterministically in the same format, which is then read back through ``read_panx``.
"""
from __future__ import annotations

import math
import random
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from torch import Tensor
from transformers import PreTrainedTokenizerFast

from common.runtime import DataError

LABELS = ("O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC")
LABEL_TO_ID = {tag: i for i, tag in enumerate(LABELS)}
IGNORE_INDEX = -100  # sub-tokens after the first of a word, special tokens, padding
SPLITS = ("train", "dev", "test")
Sentence = tuple[list[str], list[str]]  # (words, tags)


# ---------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------

def read_panx(path: str | Path, lang: str | None = None) -> list[Sentence]:
    """Read one PAN-X file into sentences.

    Args:
        path: the file.
        lang: if given, a leading ``lang:`` is stripped from every token.

    Returns:
        A list of ``(words, tags)``, each a non-empty list of equal length.

    Raises:
        DataError: if the file is missing, holds no sentence, or a line is not ``token<TAB>tag``
            with a known tag.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"PAN-X file {path} not found: put the XTREME PAN-X (WikiAnn) files under "
                        "--data-root as <lang>/<split> or <split>-<lang>.tsv, or omit --data-root "
                        "for the embedded synthetic data")
    sentences: list[Sentence] = []
    words: list[str] = []
    tags: list[str] = []
    prefix = f"{lang}:" if lang else None
    raw_bytes = path.read_bytes()
    try:
        text = raw_bytes.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw_bytes[:err.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte 0x{raw_bytes[err.start]:02x} at offset {err.start}); "
                        "PAN-X files are UTF-8") from None
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            if words:
                sentences.append((words, tags))
                words, tags = [], []
            continue
        parts = line.split("\t")
        if len(parts) != 2 or not parts[0] or parts[1] not in LABEL_TO_ID:
            raise DataError(f"{path}:{lineno}: malformed line {line!r}; expected "
                            f"'lang:token<TAB>tag' with tag in {list(LABELS)}")
        token = parts[0][len(prefix):] if prefix and parts[0].startswith(prefix) else parts[0]
        if not token:
            raise DataError(f"{path}:{lineno}: empty token in line {line!r}")
        words.append(token)
        tags.append(parts[1])
    if words:
        sentences.append((words, tags))
    if not sentences:
        raise DataError(f"PAN-X file {path} holds no sentence (empty file?)")
    return sentences


def panx_path(root: str | Path, lang: str, split: str) -> Path:
    """``<root>/<lang>/<split>`` if it exists, else ``<root>/<split>-<lang>.tsv``."""
    root = Path(root)
    nested = root / lang / split
    return nested if nested.is_file() else root / f"{split}-{lang}.tsv"


def load_language(root: str | Path, lang: str, splits: tuple[str, ...] = SPLITS) -> dict[str, list[Sentence]]:
    """All ``splits`` of one language, read with ``read_panx``."""
    return {split: read_panx(panx_path(root, lang, split), lang) for split in splits}


SUBSAMPLING = ("random", "first")


def subsample(sentences: list[Sentence], size: int, how: str = "random", seed: int = 42) -> list[Sentence]:
    """``size`` of the sentences: a seeded random draw without replacement, or the first ``size``.

    ``random`` draws the indices with NumPy's legacy generator seeded with ``seed``
    (``RandomState(seed).choice(N, size, replace=False)``), the draw of the MetaXL code's
    ``--data_seed``, so the same file gives the same subset in every run; with ``size >= N``
    every sentence is kept in file order.

    Raises:
        ValueError: on an unknown ``how`` or ``size < 1``.
    """
    if how not in SUBSAMPLING:
        raise ValueError(f"unknown subsampling {how!r}; choose from {SUBSAMPLING}")
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    if size >= len(sentences) or how == "first":
        return sentences[:size]
    return [sentences[i] for i in np.random.RandomState(seed).choice(len(sentences), size, replace=False)]


# ---------------------------------------------------------------------------------------------
# embedded synthetic languages
# ---------------------------------------------------------------------------------------------

_CONTEXT = ["the", "a", "of", "and", "was", "is", "with", "from", "to", "by", "new", "old", "first",
            "team", "city", "year", "after", "before", "then", "also", "great", "small", "north", "river"]
_TRIGGERS = {"PER": ["mister", "doctor", "singer", "king"], "ORG": ["company", "club", "party", "bank"],
             "LOC": ["in", "near", "town", "province"]}


def _names(rng: random.Random, count: int) -> list[str]:
    syllables = ["ka", "lo", "mi", "ra", "tu", "se", "no", "vi", "da", "pe", "zu", "ho", "ri", "ba", "ne"]
    return sorted({"".join(rng.choice(syllables) for _ in range(rng.randint(2, 3))) for _ in range(count)})


def _synthetic_sentence(rng: random.Random, names: dict[str, list[str]], lexicon: dict[str, str],
                        postposition: bool) -> Sentence:
    """Context words around 1-3 entities; each entity is announced by a type trigger word.

    The source language puts the trigger before the entity; the target (``postposition``) after
    it and translates context and trigger words through ``lexicon``. Entity names are shared.
    """
    words, tags = [], []
    for _ in range(rng.randint(1, 3)):
        for _ in range(rng.randint(0, 3)):
            words.append(lexicon[rng.choice(_CONTEXT)])
            tags.append("O")
        kind = rng.choice(sorted(_TRIGGERS))
        entity = [rng.choice(names[kind]) for _ in range(rng.randint(1, 2))]
        trigger = lexicon[rng.choice(_TRIGGERS[kind])]
        span = ([f"B-{kind}"] + [f"I-{kind}"] * (len(entity) - 1))
        if postposition:
            words += entity + [trigger]
            tags += span + ["O"]
        else:
            words += [trigger] + entity
            tags += ["O"] + span
    words.append(lexicon[rng.choice(_CONTEXT)])
    tags.append("O")
    return words, tags


def write_synthetic_panx(root: str | Path, source: str, target: str, sizes: dict[str, dict[str, int]]) -> Path:
    """Write a deterministic synthetic source/target language pair in PAN-X format.

    Both languages tag the same entity names (PER, ORG, LOC); the target renames a third of the
    context and trigger words kept and moves triggers behind entities: a shared structure that a
    transformation of source representations can map onto the target.

    Args:
        root: output folder; files go to ``<root>/<lang>/<split>``.
        source, target: language codes (also seed the target's lexicon).
        sizes: ``{lang: {split: n_sentences}}``.

    Returns:
        ``root``.
    """
    root = Path(root)
    rng = random.Random(0)
    names = {kind: _names(rng, 30) for kind in sorted(_TRIGGERS)}
    vocabulary = _CONTEXT + [w for ws in _TRIGGERS.values() for w in ws]
    target_rng = random.Random(zlib.crc32(target.encode()))
    lexicons = {source: {w: w for w in vocabulary},
                target: {w: (w if target_rng.random() < 0.35 else w[::-1] + "q") for w in vocabulary}}
    for lang in (source, target):
        for split, count in sizes[lang].items():
            split_rng = random.Random(zlib.crc32(f"{lang}/{split}".encode()))
            lines = []
            for _ in range(count):
                words, tags = _synthetic_sentence(split_rng, names, lexicons[lang], postposition=lang == target)
                lines += [f"{lang}:{w}\t{t}" for w, t in zip(words, tags)] + [""]
            path = root / lang / split
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


# ---------------------------------------------------------------------------------------------
# tokenisation and batching
# ---------------------------------------------------------------------------------------------

def build_vocab(sentences: list[Sentence]) -> dict[str, int]:
    """Whole-word vocabulary with XLM-R's special-token ids: <s> 0, <pad> 1, </s> 2, <unk> 3."""
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for words, _ in sentences:
        for w in words:
            vocab.setdefault(w, len(vocab))
    return vocab


def word_level_tokenizer(vocab: dict[str, int]) -> PreTrainedTokenizerFast:
    """A fast whole-word tokenizer (one sub-token per word, unseen words -> <unk>) over ``vocab``.

    It follows XLM-R's conventions (``<s> words </s>``, same special ids), so the tiny model and
    the real tokenizer go through the same encoding code.
    """
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")


def align_labels(word_ids: list[int | None], word_label_ids: list[int]) -> list[int]:
    """Token labels from word labels: the first sub-token of a word gets its label, others ignored.

    Args:
        word_ids: for each sub-token, the index of its word or None (special tokens), as from a
            fast tokenizer's ``word_ids()``.
        word_label_ids: the label id of each word.

    Returns:
        One label per sub-token, ``IGNORE_INDEX`` except on first sub-tokens.
    """
    labels, previous = [], None
    for wid in word_ids:
        labels.append(word_label_ids[wid] if wid is not None and wid != previous else IGNORE_INDEX)
        previous = wid
    return labels


INPUT_FORMATS = ("authors", "xlmr")


@dataclass(frozen=True)
class InputFormat:
    """How sentences become model input.

    ``authors`` (the MetaXL/EvoGrad code, ``ondrejbohdal/evograd``, ``CrossLingualLearningMetaXL/models.py``
    lines 25-26, 40-41, 53-55, 89 and 592-601): the ids of the strings ``[CLS]`` and ``[SEP]`` around the
    words (XLM-R's vocabulary has neither, so both are ``<unk>``), a word with no sub-token becomes the
    id of ``[OOV]`` (``<unk>`` too), the whole sequence is cut to the length (the end token goes with
    it), padding with id 0, and position ids 0..T-1 passed explicitly. ``xlmr``: the tokenizer's own
    ``<s> … </s>``, its pad id, and the model's own position ids (RoBERTa: padding_idx + 1 onwards).
    """

    name: str
    pad_id: int
    start_id: int | None = None
    end_id: int | None = None
    empty_word_id: int | None = None
    explicit_positions: bool = False


def input_format(tokenizer, name: str = "authors") -> InputFormat:
    """The ``InputFormat`` called ``name`` for ``tokenizer`` (special ids looked up in its vocabulary).

    Raises:
        ValueError: on an unknown name.
    """
    if name == "authors":
        cls_id, sep_id, oov_id = tokenizer.convert_tokens_to_ids(["[CLS]", "[SEP]", "[OOV]"])
        return InputFormat("authors", pad_id=0, start_id=cls_id, end_id=sep_id, empty_word_id=oov_id,
                           explicit_positions=True)
    if name == "xlmr":
        return InputFormat("xlmr", pad_id=tokenizer.pad_token_id)
    raise ValueError(f"unknown input format {name!r}; choose from {INPUT_FORMATS}")


@dataclass
class Encoded:
    """One sentence as model input: ``input_ids`` and aligned ``labels`` (same length).

    ``label_words[k]`` is the index of the word whose label sits at the k-th labelled sub-token,
    so predictions go back to their words even where a word has no sub-token or was cut off.
    """

    input_ids: list[int]
    labels: list[int]
    n_words: int
    label_words: list[int] | None = None


def encode(tokenizer, sentences: list[Sentence], max_length: int, fmt: InputFormat | None = None) -> list[Encoded]:
    """Tokenise word lists (at most ``max_length`` sub-tokens) and align labels; ``fmt`` None is ``xlmr``."""
    if fmt is not None and fmt.name == "authors":
        return [_encode_authors(tokenizer, words, tags, max_length, fmt) for words, tags in sentences]
    out = []
    for words, tags in sentences:
        enc = tokenizer(words, is_split_into_words=True, truncation=True, max_length=max_length)
        word_ids = enc.word_ids()
        labels = align_labels(word_ids, [LABEL_TO_ID[t] for t in tags])
        label_words = [w for w, lab in zip(word_ids, labels) if lab != IGNORE_INDEX]
        out.append(Encoded(list(enc["input_ids"]), labels, len(words), label_words))
    return out


def _encode_authors(tokenizer, words: list[str], tags: list[str], max_length: int, fmt: InputFormat) -> Encoded:
    """``[CLS]`` word pieces ``[SEP]``, an empty word as ``[OOV]``, then cut to ``max_length`` (``InputFormat``)."""
    pieces = tokenizer(list(words), add_special_tokens=False)["input_ids"]
    ids, labels, label_words = [fmt.start_id], [IGNORE_INDEX], []
    for index, (sub, tag) in enumerate(zip(pieces, tags)):
        sub = list(sub) or [fmt.empty_word_id]
        ids += sub
        labels += [LABEL_TO_ID[tag]] + [IGNORE_INDEX] * (len(sub) - 1)
        label_words.append(index)
    ids, labels = (ids + [fmt.end_id])[:max_length], (labels + [IGNORE_INDEX])[:max_length]
    kept = sum(lab != IGNORE_INDEX for lab in labels)
    return Encoded(ids, labels, len(words), label_words[:kept])


def collate(items: list[Encoded], pad_id: int | InputFormat) -> dict[str, Tensor]:
    """Pad to the longest item: ``input_ids``, ``attention_mask``, ``labels``, each [B, T].

    ``pad_id`` is the pad id or an ``InputFormat`` (its pad id; with explicit positions the batch also
    holds ``position_ids`` 0..T-1).
    """
    fmt = pad_id if isinstance(pad_id, InputFormat) else None
    pad_id = fmt.pad_id if fmt is not None else pad_id
    length = max(len(it.input_ids) for it in items)
    ids = torch.full((len(items), length), pad_id, dtype=torch.long)
    labels = torch.full((len(items), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(items), length), dtype=torch.long)
    for i, it in enumerate(items):
        n = len(it.input_ids)
        ids[i, :n] = torch.tensor(it.input_ids)
        labels[i, :n] = torch.tensor(it.labels)
        mask[i, :n] = 1
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if fmt is not None and fmt.explicit_positions:
        batch["position_ids"] = torch.arange(length).expand(len(items), length).clone()
    return batch


def split_batch(batch: dict[str, Tensor], n_first: int) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Rows ``[:n_first]`` and ``[n_first:]`` of a collated batch, each cut to its longest row.

    Raises:
        ValueError: unless both parts are non-empty.
    """
    n = batch["input_ids"].shape[0]
    if not 0 < n_first < n:
        raise ValueError(f"cannot split a batch of {n} sentences after {n_first}: both parts must be non-empty")

    def part(rows: slice) -> dict[str, Tensor]:
        length = int(batch["attention_mask"][rows].sum(1).max())
        return {k: v[rows, :length] for k, v in batch.items()}
    return part(slice(0, n_first)), part(slice(n_first, n))


def epoch_batches(items: list[Encoded], batch_size: int, generator: torch.Generator, pad: int | InputFormat):
    """Shuffled batches covering ``items`` once (the last one may be smaller)."""
    order = torch.randperm(len(items), generator=generator).tolist()
    for start in range(0, len(order), batch_size):
        yield collate([items[i] for i in order[start:start + batch_size]], pad)


def cycle_batches(items: list[Encoded], batch_size: int, generator: torch.Generator, pad: int | InputFormat):
    """Endless shuffled full batches (reshuffled every pass; the order wraps around to fill the last)."""
    while True:
        order = torch.randperm(len(items), generator=generator).tolist()
        order += order[: (-len(order)) % batch_size]  # wrap so every batch is full
        for start in range(0, len(order), batch_size):
            yield collate([items[i] for i in order[start:start + batch_size]], pad)


TARGET_BATCHES = ("loader", "wrap")


def loader_batches(items: list[Encoded], batch_size: int, seed: int, pad: int | InputFormat, start: int = 0):
    """Endless batches as the MetaXL code's ``DataIterator`` over a shuffled ``DataLoader``.

    Each pass over ``items`` is a new shuffle cut into ⌈N / batch_size⌉ batches, the last one
    short (no ``drop_last``: 100 sentences in batches of 12 give 8 of 12 and one of 4), and the
    stream never restarts (``ondrejbohdal/evograd``, ``CrossLingualLearningMetaXL/data_utils.py``
    lines 4-21, ``mtrain.py`` line 799). Pass p's order depends only on (``seed``, p), so the
    stream can be resumed at batch ``start`` (the number of batches already drawn).
    """
    per_pass = math.ceil(len(items) / batch_size)
    epoch, offset = divmod(start, per_pass)
    while True:
        order = torch.randperm(len(items), generator=torch.Generator().manual_seed(
            zlib.crc32(f"target/{seed}/{epoch}".encode()))).tolist()
        for k in range(offset, per_pass):
            yield collate([items[i] for i in order[k * batch_size:(k + 1) * batch_size]], pad)
        epoch, offset = epoch + 1, 0
