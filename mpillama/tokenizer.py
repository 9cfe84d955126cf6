"""Text <-> token ids: one Tokenizer type over the `tokenizers` library, built from any model format.

Owns: turning a GGUF's tokenizer.* metadata, a Hugging Face tokenizer.json folder or a
distributed-llama .t vocabulary into a `tokenizers.Tokenizer` (the library does the BPE, the
byte-level mapping, byte fallback and special-token matching; nothing here re-implements them),
plus what the library leaves to the caller: BOS/EOS/end-of-turn ids, whether to add BOS, the chat
template, and a streaming decoder that only emits complete UTF-8.

How each source maps onto the library (llama.cpp is the behaviour we match; its test vectors
are the tests):
  GGUF 'gpt2'   byte-level BPE: the tokenizer.ggml.pre name picks llama.cpp's pre-tokenizer
                regexes (Split pre-tokenizers), then ByteLevel without its own regex; merges by rank.
  GGUF 'llama'  SentencePiece BPE: merges derived from the token scores, "▁" for spaces with a
                prepended "▁" per text segment, byte fallback to <0xXX> tokens.
  tokenizer.json used as is; bos/eos/template from tokenizer_config.json (+ config.json,
                generation_config.json for EOS lists).
  .t            see tokenizer_from_dllama.
Control (type 3), unknown (2) and user-defined (4) tokens are added tokens, so their text written
in a prompt (e.g. <|start_header_id|>) becomes their id.
Imports nothing from the package but errors and files (one line for a file that cannot be read),
and lazily the readers of the files it is given:
formats.dllama (.t magic numbers and layout) and formats.gguf (a .gguf's header); never mpi4py.
"""

from __future__ import annotations

import codecs
import json
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers

from mpillama.errors import MpillamaError
from mpillama.files import kind_of, reading, shown

# GGUF tokenizer.ggml.token_type values
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

# Token texts that end generation when the model emits them (llama.cpp's end-of-generation list).
EOG_TEXTS = frozenset({
    "<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
    "<|end_of_text|>", "<EOT>", "_<EOT>", "<｜end▁of▁sentence｜>", "</s>",
})


# ---------------------------------------------------------------------------------------------
# Pre-tokenizer regexes, by tokenizer.ggml.pre (the patterns llama.cpp uses for each name).
# Each entry is a list of regexes applied one after another (every split of the previous one is
# split again by the next), as llama.cpp and a Sequence of Split pre-tokenizers both do.

_CONTRACTIONS = "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_RE_LLAMA3 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
              r"|\s+(?!\S)|\s+")
_RE_QWEN2 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
             r"|\s+(?!\S)|\s+")
_RE_QWEN35 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_RE_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"


@dataclass(frozen=True)
class PreTokenizer:
    """How one tokenizer.ggml.pre family splits text before byte-level BPE."""

    regexes: tuple[str, ...]
    ignore_merges: bool = False  # a whole pre-token found in the vocabulary is taken as is (Llama 3)
    # Unicode NFC first, as Qwen 2/3's tokenizer.json does (llama.cpp does not; its qwen2 vectors hold
    # no decomposed text, so they pass either way). Qwen 3.5's vectors show it does without.
    nfc: bool = False


_LLAMA3 = PreTokenizer((_RE_LLAMA3,), ignore_merges=True)
_QWEN2 = PreTokenizer((_RE_QWEN2,), nfc=True)
_GPT2 = PreTokenizer((_RE_GPT2,))
_DIGITS_THEN_GPT2 = PreTokenizer((r"\p{N}", _RE_GPT2))
PRE_TOKENIZERS: dict[str, PreTokenizer] = {
    "llama3": _LLAMA3, "llama-v3": _LLAMA3, "llama-bpe": _LLAMA3, "falcon3": _LLAMA3,
    "dbrx": PreTokenizer((_RE_LLAMA3,)), "smaug-bpe": PreTokenizer((_RE_LLAMA3,)),
    "qwen2": _QWEN2, "deepseek-r1-qwen": _QWEN2, "megrez": _QWEN2,
    "qwen35": PreTokenizer((_RE_QWEN35,)),
    "gpt-2": _GPT2, "phi-2": _GPT2, "mpt": _GPT2, "olmo": _GPT2, "jais": _GPT2,
    "starcoder": _DIGITS_THEN_GPT2, "refact": _DIGITS_THEN_GPT2, "smollm": _DIGITS_THEN_GPT2,
    "codeshell": _DIGITS_THEN_GPT2, "command-r": _DIGITS_THEN_GPT2,
    "falcon": PreTokenizer((r"[\p{P}\$\+<=>\^~\|`]+", _RE_GPT2, "[0-9][0-9][0-9]")),
    "default": PreTokenizer((r"[\p{P}\$\+<=>\^~\|]+", _RE_GPT2, r"\p{N}+", "[0-9][0-9][0-9]")),
}


@lru_cache(maxsize=1)
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table used by byte-level BPE vocabularies."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


@lru_cache(maxsize=1)
def unicode_to_byte() -> dict[str, int]:
    return {c: b for b, c in byte_to_unicode().items()}


# ---------------------------------------------------------------------------------------------
# The tokenizer


@dataclass
class StreamDecoder:
    """Turns generated ids into text as they come, holding back bytes of an unfinished character.

    Byte-fallback (<0xE2>) and byte-level pieces can split one character over several tokens;
    push() returns only complete text. Control tokens render as nothing unless `special`.
    """

    pieces: Sequence[bytes]  # (vocab_size,) the bytes each id stands for
    hidden: frozenset[int]  # ids that render as nothing (control tokens when not `special`)
    _utf8: codecs.IncrementalDecoder = field(
        init=False, repr=False, default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace"))

    def push(self, token_id: int) -> str:
        if token_id in self.hidden:
            return ""
        return self._utf8.decode(self.pieces[token_id])

    def finish(self) -> str:
        """What is left: an unfinished character becomes U+FFFD."""
        return self._utf8.decode(b"", final=True)


@dataclass
class Tokenizer:
    """A tokenizers.Tokenizer plus the facts the model file knows and the library does not."""

    hf: tokenizers.Tokenizer
    vocab_size: int
    bos_id: int | None
    eos_id: int | None  # the file's own EOS (its text is the chat template's eos_token)
    eos_ids: frozenset[int]  # EOS plus end-of-turn tokens: generation stops on any of them
    add_bos: bool  # encode() puts BOS first unless told otherwise
    chat_template: str | None
    pieces: list[bytes]  # (vocab_size,) bytes of each id, for streaming
    special_ids: frozenset[int]  # control and unknown tokens
    kind: str  # where it came from: "gguf-gpt2", "gguf-llama", "hf", "dllama"

    def encode(self, text: str, add_bos: bool | None = None, *, parse_special: bool = True) -> list[int]:
        """Token ids of `text`; special-token text in it becomes their ids unless parse_special=False.

        BOS is added when add_bos (default: the tokenizer's add_bos) and the text does not already
        start with it, so a chat template that writes bos_token itself does not get two.
        """
        check_text(text)
        self.hf.encode_special_tokens = not parse_special
        ids = self.hf.encode(text, add_special_tokens=False).ids
        if add_bos is None:
            add_bos = self.add_bos
        if add_bos and self.bos_id is not None and not (ids and ids[0] == self.bos_id):
            ids.insert(0, self.bos_id)
        return ids

    def decode(self, ids: Sequence[int], *, special: bool = True) -> str:
        """Text of `ids` (the library's decoder; control tokens as their text unless special=False)."""
        self._check_ids(ids)
        return self.hf.decode(list(ids), skip_special_tokens=not special)

    def stream(self, *, special: bool = False) -> StreamDecoder:
        """A decoder for generated tokens; control tokens (BOS, <|eot_id|>...) print as nothing by default."""
        return StreamDecoder(self.pieces, frozenset() if special else self.special_ids)

    def token_piece(self, token_id: int) -> str:
        """The vocabulary entry as stored (e.g. 'ĠHello', '▁Hello', '<0x0A>')."""
        self._check_ids([token_id])
        piece = self.hf.id_to_token(token_id)
        return piece if piece is not None else self.pieces[token_id].decode("utf-8", "backslashreplace")

    @property
    def bos_text(self) -> str:
        """BOS as text, for chat templates' bos_token ('' when there is none)."""
        return "" if self.bos_id is None else self.pieces[self.bos_id].decode("utf-8", "replace")

    @property
    def eos_text(self) -> str:
        """EOS as text, for chat templates' eos_token ('' when there is none)."""
        return "" if self.eos_id is None else self.pieces[self.eos_id].decode("utf-8", "replace")

    def _check_ids(self, ids: Sequence[int]) -> None:
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise MpillamaError(
                    f"token id {i} is outside the vocabulary (0..{self.vocab_size - 1}): "
                    "the model and tokenizer do not match; pass the model's own tokenizer"
                )


def check_text(text: str, what: str = "the text") -> None:
    """Refuse a str that cannot be UTF-8: bytes that were not UTF-8 in a command-line argument arrive
    as lone surrogates (U+DC80..U+DCFF, PEP 383), and JSON can spell surrogates too. Replacing them
    would run a prompt the user did not write, so the first one is named instead."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        code = ord(text[e.start])
        byte = f" (the byte {code - 0xDC00:#04x}, which is not UTF-8)" if 0xDC80 <= code <= 0xDCFF else ""
        raise MpillamaError(f"{what} holds U+{code:04X} at character {e.start}{byte}: it is not valid Unicode "
                            "text; pass it as UTF-8") from None


def _special_ids(types: Sequence[int]) -> frozenset[int]:
    return frozenset(i for i, t in enumerate(types) if t in (TOKEN_CONTROL, TOKEN_UNKNOWN))


def _eog_ids(tokens: Sequence[str], types: Sequence[int], *known: int | None) -> frozenset[int]:
    """The given EOS/EOT ids plus every non-normal token whose text is a known end-of-turn marker."""
    ids = {i for i in known if i is not None}
    ids |= {i for i, (text, t) in enumerate(zip(tokens, types)) if t != TOKEN_NORMAL and text in EOG_TEXTS}
    return frozenset(ids)


def _add_special_tokens(hf: tokenizers.Tokenizer, tokens: Sequence[str], types: Sequence[int]) -> None:
    """Control/unknown tokens become special added tokens, user-defined ones plain added tokens.

    Every such text is already in the model's vocabulary, so the library keeps its id. Special ones
    are not split when encode(parse_special=False); user-defined ones always are, as in llama.cpp.
    """
    added = []
    for text, t in zip(tokens, types):
        if t in (TOKEN_CONTROL, TOKEN_UNKNOWN):
            added.append(AddedToken(text, special=True, normalized=False))
        elif t == TOKEN_USER_DEFINED:
            added.append(AddedToken(text, special=False, normalized=False))
    hf.add_tokens(added)


def _vocab_dict(tokens: Sequence[str]) -> dict[str, int]:
    vocab: dict[str, int] = {}
    for i, text in enumerate(tokens):
        if text in vocab:
            raise MpillamaError(
                f"tokenizer vocabulary has {text!r} twice (ids {vocab[text]} and {i}): the file is corrupt; "
                "re-convert the model"
            )
        vocab[text] = i
    return vocab


# ---------------------------------------------------------------------------------------------
# GGUF


def tokenizer_from_gguf_metadata(meta: dict[str, Any]) -> Tokenizer:
    """Build from a GGUF's tokenizer.* keys as Python values.

    Keys may come with their full names ('tokenizer.ggml.tokens', ...) or without their prefix
    ('tokens', 'bos_token_id', 'chat_template', ...), as formats.gguf's gguf_tokenizer_metadata gives them.
    """
    meta = _prefixed(meta)
    _check_meta_types(meta)
    model = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if tokens is None or len(tokens) == 0:
        raise MpillamaError("the GGUF file has no tokenizer.ggml.tokens: pass --tokenizer with a tokenizer file")
    tokens = list(tokens)
    types = list(meta.get("tokenizer.ggml.token_type") or [TOKEN_NORMAL] * len(tokens))
    if len(types) != len(tokens):
        raise MpillamaError(f"GGUF has {len(tokens)} tokens but {len(types)} token types: re-convert the model")
    if model == "gpt2":
        hf = _gguf_bpe(meta, tokens, types)
        add_bos_default = PRE_TOKENIZERS.get(meta.get("tokenizer.ggml.pre") or "default") is _LLAMA3
        bos_default = eos_default = None
    elif model == "llama":
        hf = _gguf_spm(meta, tokens, types)
        add_bos_default, bos_default, eos_default = True, 1, 2
    else:
        raise MpillamaError(
            f"tokenizer.ggml.model {shown(model)} is not supported (mpillama reads 'gpt2' byte-level BPE and "
            "'llama' SentencePiece); pass --tokenizer with the model's tokenizer.json"
        )
    _add_special_tokens(hf, tokens, types)
    bos = _token_id(meta, "tokenizer.ggml.bos_token_id", len(tokens), bos_default)
    eos = _token_id(meta, "tokenizer.ggml.eos_token_id", len(tokens), eos_default)
    eot = _token_id(meta, "tokenizer.ggml.eot_token_id", len(tokens), None)
    eom = _token_id(meta, "tokenizer.ggml.eom_token_id", len(tokens), None)
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", add_bos_default)) and bos is not None
    pieces = _pieces(tokens, types, "bytelevel" if model == "gpt2" else "spm")
    return Tokenizer(
        hf=hf, vocab_size=len(tokens), bos_id=bos, eos_id=eos, eos_ids=_eog_ids(tokens, types, eos, eot, eom),
        add_bos=add_bos, chat_template=meta.get("tokenizer.chat_template"), pieces=pieces,
        special_ids=_special_ids(types), kind=f"gguf-{model}",
    )


def _prefixed(meta: dict[str, Any]) -> dict[str, Any]:
    """Full GGUF key names: 'tokens' -> 'tokenizer.ggml.tokens', 'chat_template' -> 'tokenizer.chat_template'."""
    out = {k: v for k, v in meta.items() if k.startswith("tokenizer.")}
    for key, value in meta.items():
        if not key.startswith("tokenizer."):
            full = f"tokenizer.{key}" if key.startswith("chat_template") else f"tokenizer.ggml.{key}"
            out.setdefault(full, value)
    return out


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_list_of(test: Callable[[object], bool]) -> Callable[[object], bool]:
    return lambda x: isinstance(x, list) and all(test(e) for e in x)


# the tokenizer.* keys read here, and what each must hold (a damaged file can hold anything)
_META_TYPES: dict[str, tuple[str, Callable[[object], bool]]] = {
    "tokenizer.ggml.model": ("a string", lambda x: isinstance(x, str)),
    "tokenizer.ggml.pre": ("a string", lambda x: isinstance(x, str)),
    "tokenizer.ggml.tokens": ("a list of strings", _is_list_of(lambda x: isinstance(x, str))),
    "tokenizer.ggml.token_type": ("a list of integers", _is_list_of(_is_int)),
    "tokenizer.ggml.merges": ("a list of strings", _is_list_of(lambda x: isinstance(x, str))),
    "tokenizer.ggml.scores": ("a list of numbers",
                              _is_list_of(lambda x: isinstance(x, (int, float)) and not isinstance(x, bool))),
    "tokenizer.ggml.bos_token_id": ("an integer", _is_int),
    "tokenizer.ggml.eos_token_id": ("an integer", _is_int),
    "tokenizer.ggml.eot_token_id": ("an integer", _is_int),
    "tokenizer.ggml.eom_token_id": ("an integer", _is_int),
    "tokenizer.ggml.add_bos_token": ("true or false", lambda x: isinstance(x, bool)),
    "tokenizer.ggml.add_space_prefix": ("true or false", lambda x: isinstance(x, bool)),
    "tokenizer.chat_template": ("a string", lambda x: isinstance(x, str)),
}


def _check_meta_types(meta: dict[str, Any]) -> None:
    """Every tokenizer key mpillama reads holds the kind of value GGUF files store there."""
    for key, (kind, test) in _META_TYPES.items():
        if key in meta and not test(meta[key]):
            value = meta[key]
            found = f"a list of {len(value)}" if isinstance(value, list) else f"{type(value).__name__} {shown(value)}"
            raise MpillamaError(f"GGUF {key} is {found}, where llama.cpp writes {kind}: the vocabulary is damaged; "
                                "re-convert the model or pass --tokenizer with its tokenizer.json")


def _token_id(meta: dict[str, Any], key: str, n_vocab: int, default: int | None) -> int | None:
    value = meta.get(key, default)
    if value is None:
        return None
    if not 0 <= value < n_vocab:
        raise MpillamaError(f"GGUF {key} = {value} is outside the vocabulary of {n_vocab}: re-convert the model")
    return value


def _gguf_bpe(meta: dict[str, Any], tokens: list[str], types: list[int]) -> tokenizers.Tokenizer:
    """Byte-level BPE ('gpt2'): pre-tokenizer regexes by name, ByteLevel mapping, merges by rank."""
    pre_name = meta.get("tokenizer.ggml.pre") or "default"
    pre = PRE_TOKENIZERS.get(pre_name)
    if pre is None:
        raise MpillamaError(
            f"tokenizer.ggml.pre {pre_name!r} is not supported (known: {', '.join(sorted(PRE_TOKENIZERS))}); "
            "pass --tokenizer with the model's tokenizer.json"
        )
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or []]
    vocab = _vocab_dict(tokens)
    try:
        hf = tokenizers.Tokenizer(models.BPE(vocab, merges, ignore_merges=pre.ignore_merges))
    except Exception as e:  # noqa: BLE001 - the library raises a plain Exception ("Error while initializing BPE")
        raise _bad_merges(merges, vocab) or MpillamaError(f"the tokenizers library refuses the vocabulary ({e}): "
                                                          "re-convert the model") from None
    if pre.nfc:
        hf.normalizer = normalizers.NFC()
    splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in pre.regexes]
    hf.pre_tokenizer = pre_tokenizers.Sequence([*splits, pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                                 use_regex=False)])
    hf.decoder = decoders.ByteLevel()
    return hf


def _bad_merges(merges: list[tuple[str, ...]], vocab: dict[str, int]) -> MpillamaError | None:
    """The first merge the library cannot take, named (looked for only once it has refused them:
    checking 280k merges up front would cost half a second on every load)."""
    for i, m in enumerate(merges):
        if len(m) != 2 or not (m[0] in vocab and m[1] in vocab and m[0] + m[1] in vocab):
            what = "has no space" if len(m) != 2 else "joins tokens that are not all in the vocabulary"
            return MpillamaError(f"GGUF tokenizer.ggml.merges entry {i} {shown(' '.join(m))} {what}: the vocabulary "
                                 "is damaged; re-convert the model or pass --tokenizer with its tokenizer.json")
    return None


def _gguf_spm(meta: dict[str, Any], tokens: list[str], types: list[int]) -> tokenizers.Tokenizer:
    """SentencePiece BPE ('llama'): a merge for every split of a token into two tokens, best score first."""
    scores = meta.get("tokenizer.ggml.scores")
    if scores is None or len(scores) != len(tokens):
        raise MpillamaError("GGUF SentencePiece vocabulary has no per-token scores: re-convert the model")
    mergeable = [t in (TOKEN_NORMAL, TOKEN_USER_DEFINED) for t in types]
    merges = score_merges(tokens, [float(s) for s in scores], mergeable)
    unk = next((tokens[i] for i, t in enumerate(types) if t == TOKEN_UNKNOWN), None)
    hf = tokenizers.Tokenizer(models.BPE(_vocab_dict(tokens), merges, unk_token=unk, fuse_unk=True,
                                         byte_fallback=True))
    # llama.cpp puts a space before the text and after every special token; the library normalizes
    # each piece between added tokens separately, so Prepend does the same. Decoding drops it again.
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    hf.normalizer = normalizers.Sequence([normalizers.Prepend("▁")] * prefix + [normalizers.Replace(" ", "▁")])
    hf.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    *[decoders.Strip(" ", 1, 0)] * prefix])
    return hf


def score_merges(tokens: Sequence[str], scores: Sequence[float], mergeable: Sequence[bool]) -> list[tuple[str, str]]:
    """BPE merges equivalent to merging the adjacent pair whose joined text scores best.

    Every way of writing a mergeable token as two mergeable tokens is a merge; merges are ranked by
    the joined token's score, highest first (ties: lower token id first).
    """
    known = {t for i, t in enumerate(tokens) if mergeable[i]}
    ranked: list[tuple[float, int, int]] = []  # (-score of the joined token, its id, where it splits)
    for i, text in enumerate(tokens):
        if not mergeable[i]:
            continue
        for cut in range(1, len(text)):
            if text[:cut] in known and text[cut:] in known:
                ranked.append((-scores[i], i, cut))
    ranked.sort()
    return [(tokens[i][:cut], tokens[i][cut:]) for _, i, cut in ranked]


def _pieces(tokens: Sequence[str], types: Sequence[int], style: str) -> list[bytes]:
    """The bytes each token stands for. style: 'bytelevel' (GPT-2 table), 'spm' (▁ and <0xXX>), 'text'."""
    u2b = unicode_to_byte()
    out = []
    for text, t in zip(tokens, types):
        if t in (TOKEN_CONTROL, TOKEN_UNKNOWN, TOKEN_USER_DEFINED) or style == "text":
            out.append(text.encode("utf-8"))
        elif style == "bytelevel":
            try:
                out.append(bytes(u2b[c] for c in text))
            except KeyError:  # not a byte-level string (a plain added token): its own UTF-8
                out.append(text.encode("utf-8"))
        elif t == TOKEN_BYTE or (len(text) == 6 and text.startswith("<0x") and text.endswith(">")):  # <0x0A>
            out.append(bytes([int(text[3:5], 16)]))
        else:
            out.append(text.replace("▁", " ").encode("utf-8"))
    return out


# ---------------------------------------------------------------------------------------------
# Hugging Face folders


def tokenizer_from_hf(folder: Path) -> Tokenizer:
    """Build from a folder with tokenizer.json (+ tokenizer_config.json, config.json, generation_config.json)."""
    folder = Path(folder)
    return _tokenizer_from_json(folder / "tokenizer.json", folder)


def _tokenizer_from_json(path: Path, folder: Path) -> Tokenizer:
    if not path.is_file():
        raise MpillamaError(f"{path} not found: pass --tokenizer with a tokenizer.json, a folder holding one, "
                            "or a .t file")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise MpillamaError(f"{path} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}): "
                            "it is damaged or not a tokenizer.json; pass the model's own tokenizer.json") from None
    try:
        spec = json.loads(text)
        hf = tokenizers.Tokenizer.from_str(text)
    except Exception as e:  # JSON errors, and the library raises a plain Exception for what it cannot read
        raise MpillamaError(f"{path} is not a tokenizer.json the tokenizers library can read ({e}); "
                            "pass the model's own tokenizer.json") from None
    config = _read_json(folder / "tokenizer_config.json")
    model_configs = [_read_json(folder / "generation_config.json"), _read_json(folder / "config.json")]
    n = hf.get_vocab_size(with_added_tokens=True)
    tokens = [hf.id_to_token(i) or "" for i in range(n)]
    types = [TOKEN_NORMAL] * n
    for i, added in hf.get_added_tokens_decoder().items():
        if i < n:
            types[i] = TOKEN_CONTROL if added.special else TOKEN_USER_DEFINED
    bos = _named_id(hf, config.get("bos_token"))
    if bos is None:
        bos = next((c["bos_token_id"] for c in model_configs if isinstance(c.get("bos_token_id"), int)), None)
    eos = [_named_id(hf, config.get("eos_token"))]
    for c in model_configs:  # Llama 3.1 lists several: [128001, 128008, 128009]
        value = c.get("eos_token_id")
        eos += value if isinstance(value, list) else [value]
    if "add_bos_token" in config:
        add_bos = bool(config["add_bos_token"])
    else:  # the post-processor decides (Llama 3's adds <|begin_of_text|>)
        with_special = hf.encode("a", add_special_tokens=True).ids
        add_bos = bool(with_special) and with_special[0] == bos
    return Tokenizer(
        hf=hf, vocab_size=n, bos_id=bos, eos_id=next((e for e in eos if isinstance(e, int) and 0 <= e < n), None),
        eos_ids=_eog_ids(tokens, types, *(e for e in eos if isinstance(e, int) and 0 <= e < n)),
        add_bos=add_bos and bos is not None, chat_template=_hf_chat_template(config, folder),
        pieces=_pieces(tokens, types, _hf_piece_style(spec)), special_ids=_special_ids(types), kind="hf",
    )


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MpillamaError(f"{path} is not valid JSON ({e}); fix or remove it") from None
    return value if isinstance(value, dict) else {}


def _named_id(hf: tokenizers.Tokenizer, token: Any) -> int | None:
    """A tokenizer_config token entry ('<s>' or {'content': '<s>', ...}) as an id."""
    if isinstance(token, dict):
        token = token.get("content")
    return hf.token_to_id(token) if isinstance(token, str) else None


def _hf_chat_template(config: dict[str, Any], folder: Path) -> str | None:
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": "..."}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default", next(iter(named.values()), None))
    if template is None and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    return template if isinstance(template, str) else None


def _hf_piece_style(spec: dict[str, Any]) -> str:
    """How this tokenizer.json's vocabulary strings map to bytes, read from its decoder."""
    decoder = json.dumps(spec.get("decoder"), ensure_ascii=False)
    if '"ByteLevel"' in decoder:
        return "bytelevel"
    if '"ByteFallback"' in decoder or '"Metaspace"' in decoder or "▁" in decoder:
        return "spm"
    return "text"


# ---------------------------------------------------------------------------------------------
# distributed-llama .t


def tokenizer_from_dllama(vocab: Any) -> Tokenizer:
    """Build from a DllamaVocab (tokens as bytes, scores, bos_id, eos_ids, chat_template, add_bos).

    distributed-llama encodes llama2.c-style: ids below bos_id are regular tokens, the rest special.
    Special-token text in the prompt is matched first; the rest is cut into the shortest pieces that
    are regular tokens (single bytes, in the byte-level files its converters write for Llama 3 and
    Qwen 3), then the adjacent pair whose joined bytes form the best-scoring regular token is merged
    until no pair joins into a token. There is no pre-tokenizer: merges may cross word boundaries.

    This builds the tokenizers-library equivalent, not a hand-written encoder: tokens through the
    GPT-2 byte table, one BPE merge for every way of writing a regular token as two regular tokens,
    ranked by the joined token's score (score_merges), over the whole text (ByteLevel without its
    regex). It gives distributed-llama's ids except when two different pairs join into tokens of
    equal score (distributed-llama takes the leftmost, the library the first-ranked); the
    converters give every token a distinct score (-id), so that does not arise.
    """
    tokens: list[bytes] = [bytes(t) for t in vocab.tokens]
    scores = [float(s) for s in vocab.scores]
    n = len(tokens)
    if len(scores) != n:
        raise MpillamaError(f".t tokenizer has {n} tokens but {len(scores)} scores: regenerate the .t file")
    bos = vocab.bos_id if vocab.bos_id is not None and 0 <= vocab.bos_id < n else None
    n_regular = bos if bos is not None else n
    regular_set = set(tokens[:n_regular])
    missing = [b for b in range(256) if bytes([b]) not in regular_set]
    if missing:
        raise MpillamaError(
            f".t tokenizer has no token for byte 0x{missing[0]:02X} ({len(missing)} of 256 bytes missing), so it "
            "is not a byte-level vocabulary mpillama can encode with; pass the model's tokenizer.json or GGUF "
            "via --tokenizer"
        )
    regular = [t.decode("latin-1").translate(_byte_level_table()) for t in tokens[:n_regular]]
    merges = score_merges(regular, scores[:n_regular], [True] * n_regular)
    vocab_ids: dict[str, int] = {}
    for i, text in enumerate(regular):
        vocab_ids.setdefault(text, i)  # a repeated token: distributed-llama's lookup finds either
    hf = tokenizers.Tokenizer(models.BPE(vocab_ids, merges))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    hf.decoder = decoders.ByteLevel()
    special = [t.decode("utf-8", "replace") for t in tokens[n_regular:]]
    # not in the model's vocabulary, so the library numbers them from n_regular on, in order
    hf.add_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    for k, text in enumerate(special):
        if hf.token_to_id(text) != n_regular + k:
            raise MpillamaError(f".t tokenizer special token {n_regular + k} {text!r} repeats another token's text: "
                                "regenerate the .t file")
    types = [TOKEN_NORMAL] * n_regular + [TOKEN_CONTROL] * len(special)
    eos = _eog_ids(regular + special, types, *(i for i in vocab.eos_ids if 0 <= i < n))
    return Tokenizer(
        hf=hf, vocab_size=n, bos_id=bos, eos_id=next(iter(i for i in vocab.eos_ids if 0 <= i < n), None), eos_ids=eos,
        add_bos=bool(vocab.add_bos) and bos is not None, chat_template=vocab.chat_template or None,
        pieces=tokens, special_ids=frozenset(range(n_regular, n)), kind="dllama",
    )


@lru_cache(maxsize=1)
def _byte_level_table() -> dict[int, str]:
    """str.translate table: code point b (a byte read as latin-1) -> its GPT-2 character."""
    return dict(byte_to_unicode())


# ---------------------------------------------------------------------------------------------
# Choosing a source


TOKENIZER_ADVICE = "the tokenizer is damaged or not one mpillama reads; pass the model's own tokenizer with --tokenizer"


def load_tokenizer(model_file: Any, tokenizer_path: str | None) -> Tokenizer:
    """The tokenizer for a run: --tokenizer if given (.t, tokenizer.json, a folder, or a .gguf), else the model's own.

    model_file has .format ('gguf' | 'dllama' | 'hf'), .path and .tokenizer_metadata() -> dict | None.
    Any error while reading it is one line naming the file (mpillama.files.reading).
    """
    if tokenizer_path:
        with reading(tokenizer_path, TOKENIZER_ADVICE):
            tok = _tokenizer_from_path(Path(tokenizer_path))
        rows = getattr(getattr(model_file, "config", None), "vocab_size", None)
        if rows is not None and tok.vocab_size > rows:  # fewer is fine: models pad their tables
            raise MpillamaError(f"tokenizer {tokenizer_path} has {tok.vocab_size} tokens but the model "
                                f"{model_file.path} only {rows}: its ids would run past the embedding table; "
                                "pass the model's own tokenizer")
        return tok
    fmt = getattr(model_file, "format", None)
    if fmt == "gguf":
        meta = model_file.tokenizer_metadata()
        if not meta:
            raise MpillamaError(f"{model_file.path} has no tokenizer metadata: pass --tokenizer tokenizer.json")
        with reading(model_file.path, TOKENIZER_ADVICE):
            return tokenizer_from_gguf_metadata(meta)
    if fmt == "hf":
        path = Path(model_file.path)
        folder = path if path.is_dir() else path.parent
        with reading(folder / "tokenizer.json", TOKENIZER_ADVICE):
            return tokenizer_from_hf(folder)
    if fmt == "dllama":
        raise MpillamaError(f"{model_file.path} is a distributed-llama model, which holds no tokenizer: "
                            "pass --tokenizer FILE.t")
    raise MpillamaError(f"cannot find a tokenizer for model format {fmt!r}: pass --tokenizer FILE")


def _tokenizer_from_path(path: Path) -> Tokenizer:
    advice = "pass a .t file, a tokenizer.json or a folder holding one"
    if kind_of(path, "tokenizer", advice) == "dir":
        return tokenizer_from_hf(path)
    from mpillama.formats import dllama, gguf  # the readers own the magic numbers and layouts

    with path.open("rb") as f:
        head = f.read(4)
    if len(head) == 4 and struct.unpack("<i", head)[0] in (dllama.TOKENIZER_MAGIC, dllama.OLD_TOKENIZER_MAGIC):
        return tokenizer_from_dllama(dllama.read_dllama_tokenizer(path))
    if head == gguf.GGUF_MAGIC:
        return tokenizer_from_gguf_metadata(gguf.gguf_tokenizer_metadata(gguf.read_gguf_header(path).kv) or {})
    if head.lstrip()[:1] == b"{":
        return _tokenizer_from_json(path, path.parent)
    raise MpillamaError(f"{path} is not a tokenizer mpillama knows (first bytes {head!r}): "
                        f"pass a .t file (magic {dllama.TOKENIZER_MAGIC:#x}), a tokenizer.json or a .gguf")
