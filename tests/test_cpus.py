"""Worker defaults count the CPUs this process may use, not the machine's."""

from __future__ import annotations

import os

from prefdata.tokenize import TokenizeConfig
from schemas.cpus import usable_cpus


def test_counts_the_cpus_of_the_affinity_mask(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 3}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert usable_cpus() == 2
    assert TokenizeConfig(input_dir="i", tokenizer="t", out="o").workers == 2


def test_without_an_affinity_call_counts_the_machines_cpus(monkeypatch):
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    assert usable_cpus() == 6
    monkeypatch.setattr(os, "cpu_count", lambda: None)  # "undeterminable"
    assert usable_cpus() == 1
