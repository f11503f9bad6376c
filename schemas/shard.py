"""The tokenized shard: Arrow IPC *file* format, TRL's column names, int32 token ids.

`prompt_input_ids` is exactly what the model sees before it starts an answer; `chosen_input_ids`
and `rejected_input_ids` hold the completion tokens only (ending with EOS / end-of-turn once).
`ref_*_logps` appear after `prefdata precompute-ref`: the sum of the reference model's float32
log-probs over the completion tokens (DESIGN.md, "log π(y|x)").
"""

from __future__ import annotations

import pyarrow as pa

TOKEN_IDS_TYPE = pa.list_(pa.int32())

BASE_FIELDS = [
    pa.field("id", pa.string(), nullable=False),
    pa.field("prompt_id", pa.string(), nullable=False),
    pa.field("prompt_input_ids", TOKEN_IDS_TYPE, nullable=False),
    pa.field("chosen_input_ids", TOKEN_IDS_TYPE, nullable=False),
    pa.field("rejected_input_ids", TOKEN_IDS_TYPE, nullable=False),
]
REF_FIELDS = [
    pa.field("ref_chosen_logps", pa.float32(), nullable=False),
    pa.field("ref_rejected_logps", pa.float32(), nullable=False),
]

SHARD_SCHEMA = pa.schema(BASE_FIELDS)
SHARD_WITH_REF_SCHEMA = pa.schema(BASE_FIELDS + REF_FIELDS)
REF_COLUMNS = tuple(f.name for f in REF_FIELDS)

SPLITS = ("train", "eval")


def shard_name(split: str, index: int) -> str:
    """`train-00000.arrow`, `eval-00000.arrow`: one split per file, so `DIR/train-*.arrow` is the
    training set and `DIR/*.arrow` is everything."""
    return f"{split}-{index:05d}.arrow"
