"""TRL's unpaired preference layout (the `datasets` layout `trl.KTOTrainer` takes): one completion
and a binary label per row.

    standard:        {"prompt": str, "completion": str, "label": bool}
    conversational:  {"prompt": [msg…], "completion": [msg…], "label": bool}

A string prompt is one user message, a string completion one assistant message. `label` True is
desirable; 1/0 and the feedback words of `prefdata.formats.base.parse_label` ("up", "👎", "good",
…) are read too, anything else is `invalid_label`; a source whose first rows hold other numbers
as labels (a -1/0/+1 scale, stars) is refused. Every row is an unpaired record, with or without
`--unpaired`. Rows with a `score` and no `label` are not this format (it is not detected without
`label`): `--map completion=completion --unpaired --score-threshold T` reads them, labelled by score.
"""

from __future__ import annotations

from typing import Any

from prefdata.formats.base import Candidate, Format, check_label_column, field, parse_label, turns


class TRLUnpairedFormat(Format):
    name = "trl_unpaired"
    columns = frozenset({"prompt", "completion", "label"})
    unpaired_layout = True

    def check_rows(self, source: str, rows: list[dict[str, Any]]) -> None:
        check_label_column(source, rows, "label")

    def convert(self, row: dict[str, Any]) -> list[Candidate]:
        return [{"prompt": turns(field(row, "prompt"), "prompt", "user"),
                 "completion": turns(field(row, "completion"), "completion", "assistant"),
                 "label": parse_label(field(row, "label"), "label")}]
