"""CLIP's prompt tokenizer for SD / SDXL artifacts, on the Rust `tokenizers` library alone.

diffusers' pipelines turn a prompt into the text encoder's input with transformers'
CLIPTokenizer: ``tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length,
truncation=True).input_ids``. transformers 5 builds that tokenizer on `tokenizers` from the
folder's BPE vocabulary and a fixed CLIP pipeline (tokenization_clip.py); this module builds the
same one without importing transformers, and with it torch.

- Vocabulary and merges: tokenizer.json when the folder has one (transformers 5 reads only them
  from it and builds the rest itself), else vocab.json + merges.txt (folders saved by
  transformers 4, as on the Hub).
- Special tokens: tokenizer_config.json; where it has no ``added_tokens_decoder`` (saved by
  transformers before 4.34, or by 5), special_tokens_map.json overrides it (SD-2.x's pad
  ``!`` is there) and tokenizer.json adds its ``added_tokens``. They are matched in the text
  as transformers matches them: the pad token ``!`` of SD-2.x and SDXL's tokenizer_2 is one,
  so every ``!`` in a prompt is a token of its own there.
- Truncation keeps bos ... eos; padding fills with the folder's pad token.

transformers 4's CLIPTokenizer was a Python one: without ftfy it splits CJK characters apart,
drops control characters and matches capitalised special-token text, so on such prompts it
differs from 5 and from this module.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from modelkiln.errors import ArtifactError
from modelkiln.jsonfile import read_json_object

FIX = "; rebuild the artifact"
# CLIP's words: its two special tokens, English contractions, letter runs, single digits and
# punctuation runs; the whitespace between them is dropped.
WORDS = (
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|"
    r"[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"
)
# transformers' named special tokens, in the order it adds them (the last flags of a token win).
SPECIAL_KEYS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
# CLIPTokenizer's defaults for a token the config leaves out.
CLIP_DEFAULTS = {
    "bos_token": "<|startoftext|>",
    "eos_token": "<|endoftext|>",
    "unk_token": "<|endoftext|>",
    "pad_token": "<|endoftext|>",
}
# A config without a limit (or with transformers' huge sentinel) gets CLIP's 77 positions: the
# builder exported the text encoder for that length by the same rule (models/stable_diffusion.py).
CLIP_LENGTH = 77
NO_LIMIT = 100_000
TOKEN_FLAGS = ("single_word", "lstrip", "rstrip", "normalized")


class ClipTokenizer:
    """CLIP's BPE tokenizer from an artifact's tokenizer folder, on the `tokenizers` library.

    It keeps no state between calls (no padding or truncation settings on the backend), so
    one instance can serve several threads.
    """

    def __init__(
        self, tokenizer: Tokenizer, model_max_length: int, pad_token_id: int, eos_token_id: int
    ) -> None:
        self._tokenizer = tokenizer
        self.model_max_length = model_max_length
        self.pad_token_id = pad_token_id
        self.eos_token_id = eos_token_id

    @classmethod
    def from_folder(cls, folder: Path) -> ClipTokenizer:
        """The tokenizer a diffusers pipeline folder's ``tokenizer/`` (or ``tokenizer_2/``)
        holds. A missing or malformed file raises ArtifactError."""
        folder = Path(folder)
        if not folder.is_dir():
            raise ArtifactError(f"{folder} is not a folder: the artifact has no tokenizer{FIX}")
        config_path = folder / "tokenizer_config.json"
        config = read_json_object(config_path, ArtifactError, fix=FIX)
        length = _max_length(config, config_path)
        named, extra = _special_tokens(folder, config)
        model, listed = _vocabulary(folder, named["unk_token"].content)
        if "added_tokens_decoder" in config:
            listed = _decoder(config["added_tokens_decoder"], config_path)
        # Named tokens listed with the vocabulary take those flags (transformers maps them so).
        by_content = {token.content: token for token in listed.values()}
        named = {key: by_content.get(token.content, token) for key, token in named.items()}
        added = [*(listed[i] for i in sorted(listed)), *named.values(), *extra]
        tokenizer = _clip_tokenizer(model, added)
        bos, eos, pad = (named[key].content for key in ("bos_token", "eos_token", "pad_token"))
        # bos prompt eos, as CLIPTokenizer's post-processor.
        tokenizer.post_processor = processors.RobertaProcessing(
            (eos, _token_id(tokenizer, eos, folder)),
            (bos, _token_id(tokenizer, bos, folder)),
            trim_offsets=False,
            add_prefix_space=False,
        )
        pad_id, eos_id = _token_id(tokenizer, pad, folder), _token_id(tokenizer, eos, folder)
        return cls(tokenizer, length, pad_id, eos_id)

    def __call__(self, prompts: Sequence[str]) -> np.ndarray:
        """int64 ids, (len(prompts), model_max_length): bos, the prompt's tokens (cut to fit),
        eos, then pad tokens; what diffusers' pipelines feed the text encoder."""
        if isinstance(prompts, str):
            raise TypeError("ClipTokenizer takes a list of prompts: pass [prompt]")
        length = self.model_max_length
        ids = np.full((len(prompts), length), self.pad_token_id, dtype=np.int64)
        for row, prompt in enumerate(prompts):
            tokens = self._encode(prompt)
            if len(tokens) > length:
                # transformers cuts the prompt's tokens and keeps the closing eos.
                tokens = [*tokens[: length - 1], self.eos_token_id]
            ids[row, : len(tokens)] = tokens
        return ids

    def count(self, prompt: str) -> int:
        """The prompt's tokens with bos and eos, before truncation (above model_max_length,
        the text encoder does not see the end of the prompt)."""
        return len(self._encode(prompt))

    def _encode(self, prompt: str) -> list[int]:
        # One prompt at a time: encode_batch's thread pool would make a later fork warn.
        return list(self._tokenizer.encode(prompt).ids)


def _max_length(config: Mapping[str, Any], path: Path) -> int:
    value = config.get("model_max_length")
    if value is None or (isinstance(value, int | float) and value >= NO_LIMIT):
        return CLIP_LENGTH
    if isinstance(value, bool) or not isinstance(value, int) or value < 2:
        raise ArtifactError(f"{path} has model_max_length {value!r}, not a token count{FIX}")
    return value


def _special_tokens(
    folder: Path, config: Mapping[str, Any]
) -> tuple[dict[str, AddedToken], list[AddedToken]]:
    """The named special tokens (bos, eos, unk, pad, ...) and any extra ones, with the
    precedence transformers gives the folder's files."""
    where = folder / "tokenizer_config.json"
    named = {key: _added_token(config[key], where) for key in SPECIAL_KEYS if config.get(key)}
    extras = config.get("extra_special_tokens") or config.get("additional_special_tokens")
    extra = [_added_token(value, where) for value in _token_list(extras, where)]
    legacy = folder / "special_tokens_map.json"
    if "added_tokens_decoder" not in config and legacy.is_file():
        # Written by transformers 4: this file's tokens win over the config's.
        tokens = read_json_object(legacy, ArtifactError, fix=FIX)
        named |= {
            key: _added_token(tokens[key], legacy, special=True)
            for key in SPECIAL_KEYS
            if tokens.get(key)
        }
        if tokens.get("additional_special_tokens"):
            listed = _token_list(tokens["additional_special_tokens"], legacy)
            extra = [_added_token(value, legacy, special=True) for value in listed]
    for key, default in CLIP_DEFAULTS.items():
        named.setdefault(key, _added_token(default, where))
    return {key: named[key] for key in SPECIAL_KEYS if key in named}, extra


def _decoder(entries: Any, where: Path) -> dict[int, AddedToken]:
    """tokenizer_config.json's added tokens by id (transformers 4.34 on)."""
    if not isinstance(entries, Mapping):
        raise ArtifactError(f"{where} has added_tokens_decoder {entries!r}, not an object{FIX}")
    try:
        return {int(key): _added_token(value, where) for key, value in entries.items()}
    except ValueError as error:
        raise ArtifactError(f"{where} has an added token id that is not a number{FIX}") from error


def _token_list(value: Any, where: Path) -> list[Any]:
    if value is None or isinstance(value, Mapping):  # a dict names model-specific tokens
        return []
    if not isinstance(value, list):
        raise ArtifactError(f"{where} lists its extra special tokens as {value!r}{FIX}")
    return value


def _added_token(value: Any, where: Path, special: bool | None = None) -> AddedToken:
    """transformers' AddedToken for a file's entry: a string is a special token matched on
    the raw text; an object keeps its flags (unset, normalized is ``not special``)."""
    if isinstance(value, str):
        return AddedToken(value, special=True, normalized=False)
    if not isinstance(value, Mapping) or not isinstance(value.get("content"), str):
        raise ArtifactError(f"{where} has a malformed token entry {value!r}{FIX}")
    flags = {flag: bool(value[flag]) for flag in TOKEN_FLAGS if flag in value}
    is_special = bool(value.get("special", False)) if special is None else special
    return AddedToken(value["content"], special=is_special, **flags)


def _vocabulary(folder: Path, unk: str) -> tuple[BPE, dict[int, AddedToken]]:
    """CLIP's BPE model, and the added tokens the vocabulary file lists by id (transformers
    uses them only where tokenizer_config.json has no ``added_tokens_decoder``)."""
    path = folder / "tokenizer.json"
    if path.is_file():
        return _from_tokenizer_json(path, unk)
    vocab, merges = folder / "vocab.json", folder / "merges.txt"
    missing = [file.name for file in (vocab, merges) if not file.is_file()]
    if missing:
        raise ArtifactError(f"{folder} has no tokenizer.json and no {' or '.join(missing)}{FIX}")
    try:
        model = BPE.from_file(str(vocab), str(merges), **_bpe_options(unk))
    except Exception as error:  # tokenizers raises a bare Exception
        raise ArtifactError(f"{vocab} or {merges} is malformed ({error}){FIX}") from error
    return model, {}


def _from_tokenizer_json(path: Path, unk: str) -> tuple[BPE, dict[int, AddedToken]]:
    data = read_json_object(path, ArtifactError, fix=FIX)
    model = data.get("model")
    if not isinstance(model, dict) or model.get("type", "BPE") != "BPE":
        raise ArtifactError(f"{path} does not hold a BPE model (CLIP's tokenizer is BPE){FIX}")
    entries = data.get("added_tokens") or []
    try:
        if not isinstance(model.get("vocab"), dict):
            raise ValueError("its model has no vocab object")
        # tokenizers saves a merge as a pair of tokens; before 0.20 as "left right".
        merges = [
            tuple(m.split(" ") if isinstance(m, str) else m) for m in model.get("merges") or []
        ]
        bpe = BPE(vocab=model["vocab"], merges=merges, **_bpe_options(unk))
        listed = {int(entry["id"]): _added_token(entry, path) for entry in entries}
    except ArtifactError:
        raise
    except Exception as error:  # tokenizers raises a bare Exception, pyo3 a TypeError
        raise ArtifactError(f"{path} is malformed ({error}){FIX}") from error
    return bpe, listed


def _bpe_options(unk: str) -> dict[str, Any]:
    """CLIP's BPE: words end in ``</w>``, no continuation prefix, unknowns one by one."""
    return {
        "unk_token": unk,
        "end_of_word_suffix": "</w>",
        "continuing_subword_prefix": "",
        "fuse_unk": False,
        "dropout": None,
    }


def _clip_tokenizer(model: BPE, added: Iterable[AddedToken]) -> Tokenizer:
    """transformers' CLIP pipeline around the vocabulary (the post-processor comes last: it
    needs the special tokens' ids)."""
    tokenizer = Tokenizer(model)
    # The normalizer before the added tokens: those matched on normalized text are kept
    # normalized when added.
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(WORDS), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tokenizer.add_tokens(list(added))
    return tokenizer


def _token_id(tokenizer: Tokenizer, token: str, folder: Path) -> int:
    # An added token has an id (a new one if the vocabulary lacks it); an empty one has none.
    found = tokenizer.token_to_id(token)
    if found is None:
        raise ArtifactError(f"{folder}'s special token {token!r} has no id{FIX}")
    return found


class T5Tokenizer:
    """T5's tokenizer (SD3's tokenizer_3, Flux's tokenizer_2) from the folder's tokenizer.json,
    on the `tokenizers` library: what diffusers' pipelines feed the T5 encoder,
    ``tokenizer(prompt, padding="max_length", max_length=N, truncation=True).input_ids``.

    tokenizer.json carries T5's whole pipeline (normalizer, Unigram model, the eos the
    post-processor appends), so only padding and truncation are done here; the build writes
    the file where a source folder holds only spiece.model. Stateless, like ClipTokenizer.
    """

    def __init__(self, tokenizer: Tokenizer, pad_token_id: int) -> None:
        self._tokenizer = tokenizer
        self.pad_token_id = pad_token_id
        self._specials = tokenizer.num_special_tokens_to_add(False)

    @classmethod
    def from_folder(cls, folder: Path) -> T5Tokenizer:
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise ArtifactError(f"{path} is missing: the T5 tokenizer is incomplete{FIX}")
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as error:  # the Rust library raises a bare Exception
            raise ArtifactError(f"{path} is not a tokenizer.json ({error}){FIX}") from error
        config = read_json_object(folder / "tokenizer_config.json", ArtifactError, fix=FIX)
        pad = config.get("pad_token", "<pad>")
        pad = pad.get("content") if isinstance(pad, dict) else pad
        return cls(tokenizer, _token_id(tokenizer, str(pad), folder))

    def __call__(self, prompts: Sequence[str], length: int) -> np.ndarray:
        """int64 ids, (len(prompts), length): the prompt's tokens (cut to fit), eos, pads."""
        if isinstance(prompts, str):
            raise TypeError("T5Tokenizer takes a list of prompts: pass [prompt]")
        ids = np.full((len(prompts), length), self.pad_token_id, dtype=np.int64)
        for row, prompt in enumerate(prompts):
            encoding = self._tokenizer.encode(prompt, add_special_tokens=False)
            encoding.truncate(max(length - self._specials, 0))
            tokens = self._tokenizer.post_process(encoding).ids
            ids[row, : len(tokens)] = tokens[:length]
        return ids

    def count(self, prompt: str) -> int:
        """The prompt's tokens with eos, before truncation."""
        return len(self._tokenizer.encode(prompt).ids)
