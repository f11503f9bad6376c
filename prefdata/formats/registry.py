"""The format registry: every raw format by name, and detection from a source's first rows.

Detection looks at the columns of the first rows (and, where names are not enough, at the first
row's values: an HH transcript and a TRL string answer share their column names). A format whose
columns include all of another's wins over it. Exactly one format must be left; none or several
is a UserError that names the candidates and the `--format` /
`--map` options. Adding a format = one module with a `Format` subclass + one line in FORMATS.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from prefdata.formats.arena import ArenaConversationsFormat, ArenaHumanPreferenceFormat
from prefdata.formats.base import Format, FormatOptions
from prefdata.formats.helpsteer import HelpSteer2Format, HelpSteer2PreferenceFormat
from prefdata.formats.hh import HHFormat
from prefdata.formats.judged import JudgedFormat
from prefdata.formats.llamafactory import LlamaFactorySharegptFormat, LlamaFactoryV1Format
from prefdata.formats.nectar import NectarFormat
from prefdata.formats.oasst import OasstFlatFormat, OasstTreeFormat
from prefdata.formats.openai import OpenAIPreferenceFormat
from prefdata.formats.pku import PKUSafeRLHFFormat
from prefdata.formats.shp import SHPFormat
from prefdata.formats.tabular import TabularFormat
from prefdata.formats.trl import TRLFormat
from prefdata.formats.trl_unpaired import TRLUnpairedFormat
from prefdata.formats.ultrafeedback import UltraFeedbackBinarizedFormat, UltraFeedbackFormat
from schemas.errors import UserError

FORMATS: dict[str, type[Format]] = {
    f.name: f
    for f in (TRLFormat, HHFormat, LlamaFactorySharegptFormat, LlamaFactoryV1Format, OpenAIPreferenceFormat,
              TabularFormat, SHPFormat, OasstTreeFormat, UltraFeedbackFormat, UltraFeedbackBinarizedFormat,
              ArenaHumanPreferenceFormat, ArenaConversationsFormat, NectarFormat, PKUSafeRLHFFormat,
              HelpSteer2PreferenceFormat, HelpSteer2Format, OasstFlatFormat, JudgedFormat, TRLUnpairedFormat)
}


def detect_format(source: str, sample: list[dict[str, Any]]) -> str:
    """The one format whose shape the sample rows have, or a UserError saying what to pass."""
    columns = frozenset().union(*(row.keys() for row in sample))
    matches = [name for name, f in FORMATS.items() if f.auto_detect and f.looks_like(columns, sample[0])]
    # the most specific wins: binarized UltraFeedback (prompt, chosen, rejected, score_*) over TRL
    matches = [m for m in matches if not any(FORMATS[m].columns < FORMATS[o].columns for o in matches)]
    if len(matches) == 1:
        return matches[0]
    shown = ", ".join(sorted(columns)) or "none"
    if matches:
        raise UserError(f"{source}: columns [{shown}] fit several formats ({', '.join(matches)}); pass --format NAME")
    raise UserError(
        f"{source}: no known preference format has columns [{shown}]; pass --format "
        f"({'|'.join(FORMATS)}) or --map prompt=COL,chosen=COL,rejected=COL"
    )


def build_format(
    name: str, options: FormatOptions, columns: frozenset[str], rows: Iterable[dict[str, Any]] = (), source: str = "input",
) -> Format:
    """Format `name` for a source whose first rows have `columns`; `rows`, its first parsed rows,
    are checked for what the format must see in their values (`Format.check_rows`)."""
    fmt = FORMATS[name](options, columns)
    fmt.check_rows(source, list(rows))
    return fmt
