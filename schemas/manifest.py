"""manifest.json: what each stage made, from what, with which settings, and where every row went.

A later stage reads its input's manifest first and refuses what does not fit (another schema
version, another tokenizer, stale reference log-probs, a shard whose bytes changed) with a message
that says what to re-run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from schemas.errors import UserError
from schemas.io import write_text_atomic

SCHEMA_VERSION = 1


def package_version() -> str:
    """The installed prefdata version, recorded in every manifest."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("prefdata")
    except PackageNotFoundError:  # a source tree that was never installed
        return "0.0.0+source"
MANIFEST_NAME = "manifest.json"
# Every row or answer a stage refuses, one JSON object per line with its reason (ingest, judge).
QUARANTINE_FILE = "quarantine.jsonl"

Stage = Literal["ingest", "curate", "tokenize", "precompute-ref", "train", "eval", "generate", "judge", "iterate"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class InputFile(_Strict):
    path: str
    sha256: str | None = None  # None for a Hub dataset or a directory of files
    bytes: int | None = None
    rows: int | None = None  # rows read from this input


class Counts(_Strict):
    """`read == kept + sum(dropped.values())`, checked on construction: a manifest whose numbers do
    not add up cannot be written."""

    read: int = Field(ge=0)
    kept: int = Field(ge=0)
    dropped: dict[str, int] = {}

    @model_validator(mode="after")
    def _adds_up(self) -> Counts:
        if any(n < 0 for n in self.dropped.values()):
            raise ValueError(f"negative drop count in {self.dropped}")
        total = self.kept + sum(self.dropped.values())
        if total != self.read:
            raise ValueError(
                f"counts do not add up: read {self.read} != kept {self.kept} + dropped "
                f"{sum(self.dropped.values())} {self.dropped}"
            )
        return self


class TokenizerFingerprint(_Strict):
    name_or_path: str
    files_sha256: str  # hash over the tokenizer's files (vocab, merges, config, template)
    chat_template_sha256: str | None
    vocab_size: int
    eos_token_id: int | None
    bos_token_id: int | None
    pad_token_id: int | None


class ModelFingerprint(_Strict):
    name_or_path: str
    config_sha256: str
    weights_sha256: str
    dtype: str
    device_type: str


class ShardFile(_Strict):
    name: str  # relative to the manifest's directory
    split: str
    rows: int = Field(ge=0)
    sha256: str


class Manifest(_Strict):
    stage: Stage
    schema_version: int = SCHEMA_VERSION
    package_version: str
    config: dict[str, Any]  # the stage's pydantic config, dumped: enough to repeat the run
    inputs: list[InputFile] = []
    counts: Counts
    outputs: list[str] = []  # files written, relative to the manifest's directory
    shards: list[ShardFile] = []
    tokenizer: TokenizerFingerprint | None = None
    reference: ModelFingerprint | None = None
    stats: dict[str, Any] = {}  # stage-specific figures (pairs per prompt, padding efficiency, …)
    versions: dict[str, str] = {}  # library versions that can change the numbers

    def write(self, directory: str | Path) -> Path:
        path = Path(directory) / MANIFEST_NAME
        write_text_atomic(path, self.model_dump_json(indent=2) + "\n")
        return path

    @classmethod
    def read(cls, directory: str | Path, stages: tuple[str, ...] | None = None) -> Manifest:
        """Load `directory/manifest.json`, with one-line errors for every way it can be unusable."""
        path = Path(directory) / MANIFEST_NAME
        if not Path(directory).is_dir():
            raise UserError(f"{directory}: not a directory")
        if not path.is_file():
            raise UserError(f"{directory}: no {MANIFEST_NAME}; is this the output of a prefdata stage?")
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UserError(f"{path}: not valid JSON ({exc}); re-run the stage that wrote it") from None
        version = raw.get("schema_version") if isinstance(raw, dict) else None
        if version != SCHEMA_VERSION:
            raise UserError(
                f"{path}: schema version {version}, this prefdata reads {SCHEMA_VERSION}; "
                "re-run the stage that wrote it with this version"
            )
        try:
            manifest = cls.model_validate(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise UserError(f"{path}: invalid manifest at {where}: {first['msg']}") from None
        if stages is not None and manifest.stage not in stages:
            raise UserError(
                f"{directory}: made by '{manifest.stage}', expected the output of {' or '.join(stages)}"
            )
        return manifest
