"""Text shipped with offload (``corpus.txt``: what `offload train` learns from by default), and the data layer of
fine-tuning: records read from a source, encoded with a tokenizer, cached as token files, packed into batches.

    read_records(path) -> records -> Encoder(tokenizer).encode -> tokenize(...) -> TokenizedData -> PackedBlocks
"""

from offload.data.blocks import PackedBlocks
from offload.data.encode import Encoded, Encoder
from offload.data.records import Record, kind_of, read_records
from offload.data.token_cache import TokenizedData, tokenize

__all__ = ["Encoded", "Encoder", "PackedBlocks", "Record", "TokenizedData", "kind_of", "read_records", "tokenize"]
