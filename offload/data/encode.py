"""Records to token ids, with the mask of the tokens the loss is computed on.

An :class:`Encoder` wraps a Hugging Face fast tokenizer (or none: byte-level ids) and turns a batch of
:class:`~offload.data.records.Record` into :class:`Encoded` examples. Which tokens are trained depends on the
record's kind: all of a text; the completion (and its end of sequence) of a prompt/completion pair; the assistant
turns of a conversation.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from offload.data.records import KINDS, Record, kind_of
from offload.errors import ConfigError

log = logging.getLogger("offload")

BYTE_VOCAB = 256
# Byte-level documents are separated by a blank line, as in the text they usually come from.
BYTE_DOCUMENT_END = b"\n\n"


@dataclass(frozen=True, slots=True)
class Encoded:
    """One encoded example: ``ids`` (uint32) and ``trained`` (bool, True where the loss counts the token), of the
    same length; ``kind`` is the record's kind (see :func:`~offload.data.records.kind_of`)."""

    kind: str
    ids: np.ndarray
    trained: np.ndarray


class Encoder:
    """Encodes records with ``tokenizer`` (a transformers fast tokenizer), or byte by byte when it is None
    (ids are the UTF-8 bytes, vocabulary 256, no special tokens).

    ``fingerprint`` identifies everything that decides the ids: equal fingerprints encode equal records to
    equal ids. ``encode`` is a pure function of the records, apart from logging once when the tokenizer has no
    end-of-sequence token.
    """

    def __init__(self, tokenizer: Any | None = None, *, model: str | None = None) -> None:
        if tokenizer is not None and not getattr(tokenizer, "is_fast", False):
            raise ConfigError(f"--model: {model or tokenizer.name_or_path}'s tokenizer is not a fast (tokenizers) "
                              "one; offload needs its offsets to find the trained tokens")
        self.tokenizer = tokenizer
        self.model = model or (getattr(tokenizer, "name_or_path", "") or "the model")
        self.eos_token_id: int | None = None if tokenizer is None else tokenizer.eos_token_id
        self._warned_no_eos = False
        self._fingerprint: str | None = None

    @property
    def vocab_size(self) -> int:
        """The number of distinct ids ``encode`` can produce (special tokens included)."""
        return BYTE_VOCAB if self.tokenizer is None else len(self.tokenizer)

    @property
    def fingerprint(self) -> str:
        """"bytes", or a sha256 of the tokenizer's definition, its chat template and its end-of-sequence id."""
        if self._fingerprint is None:
            if self.tokenizer is None:
                self._fingerprint = "bytes"
            else:
                h = hashlib.sha256(self.tokenizer.backend_tokenizer.to_str().encode())
                h.update(json.dumps(self.tokenizer.chat_template).encode())
                h.update(json.dumps(self.eos_token_id).encode())
                self._fingerprint = h.hexdigest()
        return self._fingerprint

    def encode(self, records: Sequence[Record]) -> list[Encoded]:
        """The encoding of each record, in order. Records of one kind go to the tokenizer in one call.

        Raises ConfigError naming the record's "path:line" for a record of no known kind, or a conversation
        this encoder cannot locate the assistant turns of.
        """
        by_kind: dict[str, list[int]] = {kind: [] for kind in KINDS}
        for i, record in enumerate(records):
            by_kind[kind_of(record)].append(i)
        out: list[Encoded | None] = [None] * len(records)
        for kind, encode_kind in (("text", self._texts), ("prompt_completion", self._pairs),
                                  ("messages", self._conversations)):
            if by_kind[kind]:
                chosen = [records[i] for i in by_kind[kind]]
                for i, encoded in zip(by_kind[kind], encode_kind(chosen)):
                    out[i] = encoded
        return out  # type: ignore[return-value]  # every slot was filled: each record has exactly one kind

    def _texts(self, records: list[Record]) -> list[Encoded]:
        texts = [r.fields["text"] for r in records]
        if self.tokenizer is None:
            return [_bytes_example("text", t.encode() + BYTE_DOCUMENT_END, 0) for t in texts]
        eos = self._eos()
        out = []
        for ids in self.tokenizer(texts, add_special_tokens=True, return_attention_mask=False)["input_ids"]:
            if eos is not None and (not ids or ids[-1] != eos):
                ids.append(eos)
            out.append(Encoded("text", np.asarray(ids, dtype=np.uint32), np.ones(len(ids), dtype=bool)))
        return out

    def _pairs(self, records: list[Record]) -> list[Encoded]:
        prompts = [r.fields["prompt"] for r in records]
        completions = [r.fields["completion"] for r in records]
        if self.tokenizer is None:
            # the blank line after the completion is trained: it is where a byte-level model learns to stop
            return [_bytes_example("prompt_completion", p.encode() + c.encode() + BYTE_DOCUMENT_END, len(p.encode()))
                    for p, c in zip(prompts, completions)]
        eos = self._eos()
        end = [] if eos is None else [eos]
        prompt_ids = self.tokenizer(prompts, add_special_tokens=True, return_attention_mask=False)["input_ids"]
        completion_ids = self.tokenizer(completions, add_special_tokens=False, return_attention_mask=False)["input_ids"]
        out = []
        for p, c in zip(prompt_ids, completion_ids):
            trained = np.zeros(len(p) + len(c) + len(end), dtype=bool)
            trained[len(p):] = True
            out.append(Encoded("prompt_completion", np.asarray(p + c + end, dtype=np.uint32), trained))
        return out

    def _conversations(self, records: list[Record]) -> list[Encoded]:
        if self.tokenizer is None:
            raise ConfigError(f"{records[0].where}: 'messages' needs a model with a tokenizer (with a chat "
                              "template); byte-level data has none")
        if not self.tokenizer.chat_template:
            raise ConfigError(f"{records[0].where}: 'messages' needs a tokenizer with a chat template; "
                              f"{self.model}'s tokenizer has none")
        rendered = [self._render_turns(r) for r in records]
        batch = self.tokenizer([text for text, _ in rendered], add_special_tokens=False,
                               return_offsets_mapping=True, return_attention_mask=False)
        out = []
        for (_, spans), ids, offsets in zip(rendered, batch["input_ids"], batch["offset_mapping"]):
            starts = np.fromiter((start for start, _ in offsets), dtype=np.int64, count=len(offsets))
            trained = np.zeros(len(ids), dtype=bool)
            for lo, hi in spans:
                trained |= (starts >= lo) & (starts < hi)
            out.append(Encoded("messages", np.asarray(ids, dtype=np.uint32), trained))
        return out

    def _render_turns(self, record: Record) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and the character span of each assistant turn in it.

        Note [assistant spans]: turn i (an assistant's) spans from the end of the rendering of the messages
        before it with the generation prompt (so the "<|assistant|>" header is not trained) to the end of the
        rendering of the messages up to and including it (so its end-of-turn tokens are: the model learns to stop).
        This needs a template that renders each prefix of the conversation as a prefix of the whole; a template
        that does not (one that moves the system prompt, or marks the last turn) is refused rather than guessed.
        """
        messages = record.fields["messages"]
        full = self._render(record, messages, False)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            start = self._render(record, messages[:i], True)
            end = self._render(record, messages[:i + 1], False)
            if not (full.startswith(start) and full.startswith(end)):
                raise ConfigError(f"{record.where}: {self.model}'s chat template does not render a prefix of the "
                                  "conversation as a prefix of its rendering, so the assistant turns cannot be "
                                  "located")
            spans.append((len(start), len(end)))
        return full, spans

    def _render(self, record: Record, messages: list[dict], add_generation_prompt: bool) -> str:
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt)
        except Exception as e:  # a user's Jinja template can raise anything; name the record it failed on
            raise ConfigError(f"{record.where}: {self.model}'s chat template failed on these messages "
                              f"({type(e).__name__}: {e})") from None

    def _eos(self) -> int | None:
        if self.eos_token_id is None and not self._warned_no_eos:
            log.warning("%s's tokenizer has no end-of-sequence token: documents and completions are not "
                        "terminated", self.model)
            self._warned_no_eos = True
        return self.eos_token_id


def _bytes_example(kind: str, data: bytes, untrained: int) -> Encoded:
    """A byte-level example: the first ``untrained`` bytes are not trained, the rest are."""
    trained = np.ones(len(data), dtype=bool)
    trained[:untrained] = False
    return Encoded(kind, np.frombuffer(data, dtype=np.uint8).astype(np.uint32), trained)
