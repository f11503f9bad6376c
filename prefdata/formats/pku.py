"""PKU-SafeRLHF: `{"prompt", "response_0", "response_1", "better_response_id", "safer_response_id"}`.

`--label better` (default) takes the more helpful response as chosen, `--label safer` the safer
one; the two labels often disagree, so the choice is the user's and is kept in meta.
"""

from __future__ import annotations

from typing import Any

from prefdata.formats.base import INVALID_LABEL, Candidate, Format, FormatError, answer, field, message, text


class PKUSafeRLHFFormat(Format):
    name = "pku_saferlhf"
    columns = frozenset({"prompt", "response_0", "response_1", "better_response_id", "safer_response_id"})

    def convert(self, row: dict[str, Any]) -> list[Candidate]:
        key = f"{self.options.label}_response_id"
        best = field(row, key)
        if best not in (0, 1) or isinstance(best, bool):
            raise FormatError(INVALID_LABEL, f"'{key}' must be 0 or 1, got {best!r}")
        responses = [text(field(row, f"response_{i}"), f"response_{i}") for i in (0, 1)]
        return [{
            "prompt": [message("user", text(field(row, "prompt"), "prompt"))],
            "chosen": answer(responses[best]), "rejected": answer(responses[1 - best]),
            "meta": {"label": self.options.label},
        }]
