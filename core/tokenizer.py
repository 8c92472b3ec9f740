"""CLIP's byte-level BPE tokenizer, built with the `tokenizers` library from a model folder's files.

Padding, truncation and the attention mask follow diffusers' UnCLIPPipeline: pad to 77 with the folder's pad
token (Karlo: "!" = id 0), truncate to 77 keeping BOS and EOS, mask = 1 from BOS to EOS.
"""
from __future__ import annotations

import json
import logging
import re
import unicodedata
from pathlib import Path

import torch
from unclip.core.errors import ModelLoadError

log = logging.getLogger(__name__)

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
SPLIT_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte -> printable unicode character table (the byte-level alphabet, "!" first)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _special_token(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


class CLIPTokenizer:
    """Prompts -> (input_ids (B, 77) int64, attention_mask (B, 77) int64)."""

    def __init__(self, files: dict[str, bytes], source: str = "<memory>"):
        self.files = dict(files)  # the folder's files, written back verbatim by save()
        self.source = source
        config: dict = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            if name in files:
                try:
                    config.update(json.loads(files[name]))
                except ValueError as e:
                    raise ModelLoadError(f"{source}/{name}: not valid JSON ({e}); restore the file") from None
        try:
            self.max_length = int(config.get("model_max_length", 77))
        except (TypeError, ValueError):
            raise ModelLoadError(f"{source}/tokenizer_config.json: model_max_length "
                                 f"{config.get('model_max_length')!r} is not a number; restore the file") from None
        if self.max_length > 10**6:  # transformers' "no limit" sentinel
            self.max_length = 77
        if self.max_length < 2:
            raise ModelLoadError(f"{source}/tokenizer_config.json: model_max_length {self.max_length} leaves no room "
                                 "for BOS and EOS; restore the file")
        pad = _special_token(config.get("pad_token")) or EOS
        try:
            tok = self._build(files, source)
        except ModelLoadError:
            raise
        except Exception as e:  # json, UTF-8 and the tokenizers library's own errors: all mean a damaged file
            raise ModelLoadError(f"{source}: the tokenizer files are damaged ({type(e).__name__}: "
                                 f"{str(e).splitlines()[0][:120] if str(e) else ''}); copy the tokenizer/ folder of "
                                 "the model again") from None
        self._finish(tok, pad, source)

    @staticmethod
    def _build(files: dict[str, bytes], source: str):
        from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
        from tokenizers.models import BPE
        if "tokenizer.json" in files:
            tok = Tokenizer.from_str(files["tokenizer.json"].decode("utf-8"))
        elif "vocab.json" in files and "merges.txt" in files:
            vocab = json.loads(files["vocab.json"])
            lines = files["merges.txt"].decode("utf-8").splitlines()
            merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
            tok = Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                                end_of_word_suffix="</w>", fuse_unk=False, unk_token=EOS))
            tok.normalizer = normalizers.Sequence(
                [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
            tok.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="removed", invert=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False),
            ])
            tok.decoder = decoders.ByteLevel()
            tok.add_special_tokens([BOS, EOS])
            tok.post_processor = processors.RobertaProcessing(
                (EOS, tok.token_to_id(EOS)), (BOS, tok.token_to_id(BOS)), trim_offsets=False, add_prefix_space=False)
        else:
            raise ModelLoadError(f"{source}: no tokenizer files (need vocab.json + merges.txt, or tokenizer.json); "
                                 "copy the tokenizer/ folder of the model")
        return tok

    def _finish(self, tok, pad: str, source: str) -> None:
        for name in (BOS, EOS, pad):
            if tok.token_to_id(name) is None:
                raise ModelLoadError(f"{source}: token {name!r} is not in the vocabulary; the tokenizer files "
                                     "don't belong together")
        # transformers registers the pad token as special, so a "!" in a prompt is split off on its own: match it.
        tok.add_special_tokens([pad])
        self.pad_id = tok.token_to_id(pad)
        self.bos_id, self.eos_id = tok.token_to_id(BOS), tok.token_to_id(EOS)
        tok.no_padding()
        tok.no_truncation()
        self._tok = tok

    @classmethod
    def from_folder(cls, folder: str | Path) -> "CLIPTokenizer":
        folder = Path(folder)
        if not folder.is_dir():
            raise ModelLoadError(f"{folder}: tokenizer folder is missing; copy the tokenizer/ folder of the model")
        try:
            files = {name: (folder / name).read_bytes() for name in TOKENIZER_FILES if (folder / name).is_file()}
        except PermissionError as e:
            raise ModelLoadError(f"{e.filename}: permission denied; ask the folder's owner for read access") from None
        return cls(files, str(folder))

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in self.files.items():
            (folder / name).write_bytes(data)

    def unknown_words(self, text: str) -> list[str]:
        """The words of `text` that the vocabulary has no single token for: the model never saw them as words (they
        still tokenize, spelled out in pieces). In order, without repeats."""
        if not hasattr(self, "_words"):
            byte = bytes_to_unicode()
            self._byte, self._words = byte, set(self._tok.get_vocab())
        out: list[str] = []
        for word in re.findall(r"[^\W\d_]+", unicodedata.normalize("NFC", text).lower()):
            token = "".join(self._byte[b] for b in word.encode("utf-8")) + "</w>"
            if token not in self._words and word not in out:
                out.append(word)
        return out

    def __call__(self, prompts: str | list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(prompts, str):
            prompts = [prompts]
        L = self.max_length
        ids = torch.full((len(prompts), L), self.pad_id, dtype=torch.int64)
        mask = torch.zeros((len(prompts), L), dtype=torch.int64)
        for i, enc in enumerate(self._tok.encode_batch(list(prompts))):
            tokens = enc.ids
            if len(tokens) > L:
                dropped = len(tokens) - L
                words = self._tok.decode(tokens[L - 1:-1]).replace("</w>", " ").split()
                start = " ".join(words[:8]) + (" ..." if len(words) > 8 else "")
                start = start if len(start) <= 80 else start[:77] + "..."  # one line, however long the word
                log.warning("prompt %d is %d tokens long; the model reads %d, so the last %d were dropped "
                            "(%d words, starting %r)", i, len(tokens), L, dropped, len(words), start)
                tokens = tokens[:L - 1] + [self.eos_id]
            ids[i, :len(tokens)] = torch.tensor(tokens, dtype=torch.int64)
            mask[i, :len(tokens)] = 1
        return ids, mask


def synthetic_vocab(words: list[str], max_length: int = 77) -> dict[str, bytes]:
    """A small valid CLIP-style BPE vocabulary (byte alphabet + merges spelling `words`), for presets and demos."""
    alphabet = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for token in alphabet + [c + "</w>" for c in alphabet]:
        vocab.setdefault(token, len(vocab))
    merges: list[tuple[str, str]] = []
    for word in words:
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        while len(symbols) > 1:
            pair = (symbols[0], symbols[1])
            if pair not in merges:
                merges.append(pair)
                vocab.setdefault(pair[0] + pair[1], len(vocab))
            symbols = [pair[0] + pair[1]] + symbols[2:]
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)
    return {
        "vocab.json": json.dumps(vocab, ensure_ascii=False).encode("utf-8"),
        "merges.txt": ("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)).encode("utf-8"),
        "tokenizer_config.json": json.dumps({"model_max_length": max_length, "pad_token": "!", "bos_token": BOS,
                                             "eos_token": EOS, "unk_token": EOS}).encode("utf-8"),
    }
