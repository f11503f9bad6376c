"""The tokenized shard: Arrow IPC *file* format, TRL's column names, int32 token ids.

`prompt_input_ids` is exactly what the model sees before it starts an answer; `chosen_input_ids`
and `rejected_input_ids` hold the completion tokens only (ending with EOS / end-of-turn once).
`ref_*_logps` appear after `prefdata precompute-ref`: the sum of the reference model's float32
log-probs over the completion tokens (DESIGN.md, "log π(y|x)").

An unpaired shard (KTO's data) holds one completion per row, its `label` (True: desirable) and
`kl_completion_input_ids`: the completion of another row with a different prompt, which KTO's KL
estimate scores after this row's prompt (TRL's `KL_completion_ids`, fixed at tokenize time so that
its reference log-prob can be stored too). Its reference columns are `ref_completion_logps` and
`ref_kl_logps`. Everything that scores shards reads the two continuations of a row through
`TOKEN_COLUMNS[kind]` / `REF_COLUMNS_OF[kind]`: a pair's chosen and rejected, or an unpaired row's
completion and KL completion, so the one log-prob function serves both.
"""

from __future__ import annotations

import pyarrow as pa

from schemas.records import PAIRED, UNPAIRED

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

UNPAIRED_BASE_FIELDS = [
    *BASE_FIELDS[:3],  # id, prompt_id, prompt_input_ids
    pa.field("completion_input_ids", TOKEN_IDS_TYPE, nullable=False),
    pa.field("kl_completion_input_ids", TOKEN_IDS_TYPE, nullable=False),
    pa.field("label", pa.bool_(), nullable=False),
]
UNPAIRED_REF_FIELDS = [
    pa.field("ref_completion_logps", pa.float32(), nullable=False),
    pa.field("ref_kl_logps", pa.float32(), nullable=False),
]
UNPAIRED_SHARD_SCHEMA = pa.schema(UNPAIRED_BASE_FIELDS)
UNPAIRED_SHARD_WITH_REF_SCHEMA = pa.schema(UNPAIRED_BASE_FIELDS + UNPAIRED_REF_FIELDS)

# (prompt, first continuation, second continuation) token columns, and the two reference columns.
TOKEN_COLUMNS = {PAIRED: ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids"),
                 UNPAIRED: ("prompt_input_ids", "completion_input_ids", "kl_completion_input_ids")}
REF_COLUMNS_OF = {PAIRED: REF_COLUMNS, UNPAIRED: tuple(f.name for f in UNPAIRED_REF_FIELDS)}
SCHEMAS = {PAIRED: (SHARD_SCHEMA, SHARD_WITH_REF_SCHEMA), UNPAIRED: (UNPAIRED_SHARD_SCHEMA, UNPAIRED_SHARD_WITH_REF_SCHEMA)}


def shard_kind(schema: pa.Schema) -> str | None:
    """`paired`, `unpaired`, or None for a file that is neither kind of shard (with or without
    reference log-probs)."""
    schema = schema.remove_metadata()
    return next((kind for kind, options in SCHEMAS.items() if any(schema.equals(s) for s in options)), None)

SPLITS = ("train", "eval")


def shard_name(split: str, index: int) -> str:
    """`train-00000.arrow`, `eval-00000.arrow`: one split per file, so `DIR/train-*.arrow` is the
    training set and `DIR/*.arrow` is everything."""
    return f"{split}-{index:05d}.arrow"
