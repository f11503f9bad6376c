"""The benchmark table's arithmetic (the measurements themselves live in `make bench`, never in tests)."""

import json
import subprocess

import pytest

from benchmarks.run_all import SIZES, markdown, mfu_rows, row


def test_ratio_above_one_means_better_for_us_for_rates_and_for_memory():
    faster = row("tokenize", "tokens/s", 300.0, 100.0, "peer", "faster than the peer")
    leaner = row("train", "peak RSS MiB", 500.0, 1000.0, "peer", "≤ peer", higher_is_better=False)
    assert faster["ratio"] == 3.0 and leaner["ratio"] == 2.0
    assert row("curate", "records/s", 10.0, None, "—", "—")["ratio"] is None


MACHINE = {"cpu": "Test CPU", "cores": 2, "torch_threads": 2, "torch": "2.13.0", "transformers": "5.23.0", "trl": "1.16.0",
           "device": "cpu"}


def _section(rows: list[dict], **details: object) -> dict:
    return {"rows": rows, "started": "2026-12-07 02:00 UTC", "seconds": 600.0, "load_average_at_start": 0.5, "commit": "abc1234",
            **details}


def test_markdown_names_the_machine_and_device_and_lists_every_row_in_table_order():
    report = {
        "size": "quick", "sizes": SIZES["quick"], "machine": MACHINE,
        "sections": {  # run in another order than the table's
            "model-hh": _section([row("precompute-ref", "padding efficiency", 0.8, 0.5, "TRL", "—")],
                                 matmul_gflops=200.0, model_parameters=3_670_000),
            "data": _section([row("ingest", "rows/s", 30_000.0, 20_000.0, "datasets json+map", "≥ 30,000 rows/s"),
                              row("train KTO", "rows/s", 27.43, 9.96, "TRL", "—"),
                              row("precompute-ref", "seconds, ours fixed cost", 0.52, None, "—", "—", False)]),
        },
    }
    text = markdown(report)
    assert "Test CPU, 2 cores" in text and "device: cpu" in text and "200.0 GFLOP/s" in text and "3.67M parameters" in text
    ingest = "| ingest | rows/s | 30,000 | datasets json+map | 20,000 | 1.50× | ≥ 30,000 rows/s |"
    padding = "| precompute-ref | padding efficiency | 80.0% | TRL | 50.0% | 1.60× | — |"
    assert ingest in text and padding in text and text.index(ingest) < text.index(padding)
    # Small figures keep the digits their ratio needs; only shares are percentages.
    assert "| train KTO | rows/s | 27.4 | TRL | 9.96 | 2.75× | — |" in text and "| seconds, ours fixed cost | 0.520 | — |" in text
    assert "data (2026-12-07 02:00 UTC, 10 min, load average 0.5 at its start, commit abc1234)" in text
    assert "Not measured: engine, tokenize, model-uniform, reward-uniform, reward-hh, generate, neardup, memory." in text


def test_a_table_of_reward_sections_alone_names_the_model_and_a_section_measured_inside_another_says_so():
    report = {"size": "quick", "sizes": SIZES["quick"], "machine": MACHINE, "sections": {
        "reward-hh": _section([row("train reward model [hh]", "tokens/s", 9_000.0, 3_000.0, "TRL", "—")],
                              model_parameters=3_670_000, part_of="model-hh")}}
    text = markdown(report)
    assert "device: cpu. model 3.67M parameters." in text and "GFLOP/s" not in text
    assert "reward-hh (2026-12-07 02:00 UTC, 10 min, load average 0.5 at its start, commit abc1234; measured within model-hh's run)" in text
    assert "| train reward model [hh] | tokens/s | 9,000 | TRL | 3,000 | 3.00× | — |" in text


def test_a_stopped_run_keeps_the_sections_it_finished_and_a_later_run_fills_in_the_rest(tmp_path, monkeypatch):
    from benchmarks import run_all

    def measured(stage: str):
        return lambda bench: {"rows": [row(stage, "rows/s", 2.0, 1.0, "peer", "—")]}

    def stops(bench):
        raise KeyboardInterrupt

    monkeypatch.setattr(run_all, "machine", lambda: dict(MACHINE))
    monkeypatch.setattr(run_all, "SECTIONS", {"data": measured("ingest"), "engine": stops, "tokenize": measured("tokenize")})
    table = tmp_path / "bench.json"
    written = []

    def write(report: dict) -> None:
        table.write_text(json.dumps(report))
        written.append(sorted(report["sections"]))

    with pytest.raises(KeyboardInterrupt):
        run_all.run("quick", tmp_path, ["data", "engine", "tokenize"], run_all.new_report("quick"), write)
    assert written == [["data"]] and "Not measured: engine, tokenize." in markdown(json.loads(table.read_text()))

    monkeypatch.setitem(run_all.SECTIONS, "engine", measured("engine"))
    report = run_all.resumed_report(table, "quick")
    run_all.run("quick", tmp_path, ["tokenize", "engine"], report, write)
    text = markdown(json.loads(table.read_text()))
    assert "Not measured" not in text and text.index("| ingest |") < text.index("| engine |") < text.index("| tokenize |")

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=run_all.ROOT, capture_output=True, text=True).stdout.strip()
    recorded = [s["commit"] for s in json.loads(table.read_text())["sections"].values()]
    assert all((r or "").removesuffix("+changes") == commit for r in recorded)  # None outside a git checkout

    # Another machine's (or size's) table is neither extended nor overwritten by part of a run.
    with pytest.raises(SystemExit, match="its size, sizes differ"):
        run_all.resumed_report(table, "full")
    monkeypatch.setitem(run_all.SIZES, "quick", {**run_all.SIZES["quick"], "model_rows": 81})
    with pytest.raises(SystemExit, match="its sizes differ"):
        run_all.resumed_report(table, "quick")
    monkeypatch.undo()
    monkeypatch.setattr(run_all, "machine", lambda: {**MACHINE, "cpu": "Other CPU"})
    with pytest.raises(SystemExit, match="its machine differ"):
        run_all.resumed_report(table, "quick")
    old_layout = tmp_path / "old.json"
    old_layout.write_text(json.dumps({"size": "quick", "rows": []}))
    with pytest.raises(SystemExit, match="a table from before sections"):
        run_all.resumed_report(old_layout, "quick")


def test_gpu_check_without_cuda_says_so_in_one_line_and_exits_0():
    import subprocess
    import sys

    import torch

    if torch.cuda.is_available():
        import pytest

        pytest.skip("this machine has CUDA: make gpu-check runs the real check")
    done = subprocess.run([sys.executable, "benchmarks/gpu_check.py"], capture_output=True, text=True,
                          cwd=__import__("pathlib").Path(__file__).resolve().parents[1])
    assert done.returncode == 0 and done.stdout.count("\n") == 1 and "no CUDA device" in done.stdout


def test_gpu_check_goes_on_past_a_failed_stage_and_reports_it():
    import sys

    from benchmarks.gpu_check import _run, report_lines, run_stages

    def broken():
        seconds = _run("train fsdp", [sys.executable, "-c", "import sys; sys.exit('fsdp broke')"])
        return {"stage": "train fsdp", "seconds": seconds, "tokens_per_s": 1.0}

    ok = {"stage": "train ddp", "seconds": 12.0, "tokens_per_s": 9_000.0, "first_loss": 0.6931, "last_loss": 0.5}
    results, failures = run_stages([("train fsdp", broken), ("train ddp", lambda: ok)])
    assert [r["stage"] for r in results] == ["train fsdp", "train ddp"] and results[1] == ok
    assert len(failures) == 1 and "train fsdp failed (exit 1)" in failures[0] and "fsdp broke" in failures[0]
    lines = report_lines(results, "header")
    assert "| train fsdp | failed: train fsdp failed (exit 1): | | | | | |" in lines
    assert "| train ddp | 12 | 9,000 | 0.6931 | 0.5000 | — | — |" in lines


def test_gpu_check_on_one_gpu_says_the_multi_gpu_stages_need_two_in_one_row(tmp_path):
    from benchmarks.gpu_check import _multi_gpu, cuda_rig, report_lines

    rows = _multi_gpu(cuda_rig(1, "one GPU"), tmp_path / "model", tmp_path / "shards", tmp_path)
    assert rows == [{"stage": "multi-GPU (DDP, FSDP2, precompute-ref)", "skipped": "needs 2 GPUs; 1 visible"}]
    assert report_lines(rows, "header")[-1] == "| multi-GPU (DDP, FSDP2, precompute-ref) | needs 2 GPUs; 1 visible | | | | | |"


def test_bounds_count_each_sides_tokens_and_flops_by_hand():
    """Two pairs (prompt, chosen, rejected) = (3, 1, 2) and (1, 2, 2), one batch of both, a model of
    10 decoder parameters, 1 layer, hidden 2, vocabulary 3. Ours: 2 shared rows padded to 6; TRL:
    4 rows padded to 5 (the longer prompt + answer). Decoder FLOPs = 3 × (2·10·rows·width +
    4·1·2·rows·width²); the head (2·2·3 = 12 per projection): ours 4 per answer token (7 of them),
    TRL 3 per padded position (20)."""
    from benchmarks.bench_bounds import Shape, bounds
    from tests.test_logprobs import _columns

    columns = _columns([[1, 1, 1], [1]], [[2], [2, 2]], [[3, 3], [3, 3]])
    result = bounds(columns, Shape(10, 1, 2, 3), batch_size=2)
    assert (result.real_tokens, result.shared_tokens, result.prompt_tokens) == (15, 11, 8)
    assert (result.padded_tokens_ours, result.padded_tokens_trl) == (12, 20)
    assert result.flops_ours == 3 * (2 * 10 * 12 + 4 * 2 * 2 * 36) + 4 * 12 * 7 == 2784
    assert result.flops_trl == 3 * (2 * 10 * 20 + 4 * 2 * 4 * 25) + 3 * 12 * 20 == 4320
    assert result.ratios()["sharing"] == 15 / 11 and result.ratios()["flops"] == 4320 / 2784


def test_reward_bounds_count_the_score_head_at_two_positions_per_pair_against_every_padded_one():
    """The same two pairs, model and batches as above, objective reward: the decoder work is the
    same on each side, and no LM head; the one-output head (2·2 = 4 FLOPs per projection, 3× for
    forward and backward, no recompute) runs at 2 positions per pair for ours (4 positions), at
    every padded position for TRL (20)."""
    from benchmarks.bench_bounds import Shape, bounds
    from tests.test_logprobs import _columns

    columns = _columns([[1, 1, 1], [1]], [[2], [2, 2]], [[3, 3], [3, 3]])
    result = bounds(columns, Shape(10, 1, 2, 3), batch_size=2, objective="reward")
    assert (result.padded_tokens_ours, result.padded_tokens_trl) == (12, 20)
    assert result.flops_ours == 3 * (2 * 10 * 12 + 4 * 2 * 2 * 36) + 3 * 4 * 4 == 2496
    assert result.flops_trl == 3 * (2 * 10 * 20 + 4 * 2 * 4 * 25) + 3 * 4 * 20 == 3840
    assert result.ratios()["flops"] == 3840 / 2496
    # What ours computes (train/last_layer.py), with the layer's query projection 2 parameters and its
    # key and value ones 4: the one layer is the last, read at 4 positions of 2 rows of 6. Queries
    # 2·2·12 forward only, keys and values 3·2·4·12, the reads 3·(2·10·4 + 4·2·4·6) for the whole
    # layer (3·(2·10·12 + 4·2·2·36) = 2448) in the layout's count.
    read = bounds(columns, Shape(10, 1, 2, 3, query_parameters=2, key_value_parameters=4), batch_size=2, objective="reward")
    assert read.flops_ours == result.flops_ours and read.flops_trl == result.flops_trl
    assert read.flops_ours_computed == 2496 - 2448 + (2 * 2 * 12 + 3 * 2 * 4 * 12 + 3 * (2 * 10 * 4 + 4 * 2 * 4 * 6)) == 1200
    assert read.ratios()["flops_computed"] == 3840 / 1200
    assert bounds(columns, Shape(10, 1, 2, 3), batch_size=2).flops_ours_computed == 2784  # DPO: as the layout
    with pytest.raises(ValueError, match="objective"):
        bounds(columns, Shape(10, 1, 2, 3), batch_size=2, objective="nope")


def test_kto_bounds_follow_the_kl_layout_auto_picks_against_a_trained_and_a_no_grad_row():
    """Unpaired rows (completion in the chosen column, KL completion in the rejected one), one batch
    of 2; Shape(10 decoder parameters, 1 layer, hidden 2, vocabulary 3): the LM head 2·2·3 = 12
    FLOPs a position. TRL, in dataset order: prompt + completion padded and trained (3× forward),
    prompt + KL completion padded and scored (1×), the head at every padded position of both.
    Long prompts (8 tokens against KL completions of 2): ours one shared row each, width 7, trained,
    the head 4× at the 5 continuation tokens. Short prompts (4 against 4): ours the same two rows as
    TRL's without their extra padding, the head 4× at the 3 completion tokens and 1× at the 4 KL ones."""
    from benchmarks.bench_bounds import Shape, bounds
    from tests.test_logprobs import _columns

    long_prompts = bounds(_columns([[1] * 5, [1] * 3], [[2], [2, 2]], [[3], [3]]), Shape(10, 1, 2, 3), batch_size=2, objective="kto")
    assert (long_prompts.padded_tokens_ours, long_prompts.padded_tokens_trl) == (14, 12 + 12)
    assert long_prompts.flops_ours == 3 * (2 * 10 * 14 + 4 * 2 * 2 * 49) + 4 * 12 * 5 == 3432
    assert long_prompts.flops_trl == 3 * (2 * 10 * 12 + 4 * 2 * 2 * 36) + (2 * 10 * 12 + 4 * 2 * 2 * 36) + 12 * (3 * 12 + 12) == 3840
    short_prompts = bounds(_columns([[1, 1, 1], [1]], [[2], [2, 2]], [[3, 3], [3, 3]]), Shape(10, 1, 2, 3), batch_size=2,
                           objective="kto")
    assert (short_prompts.padded_tokens_ours, short_prompts.padded_tokens_trl) == (8 + 10, 8 + 10)
    assert short_prompts.flops_ours == 3 * (2 * 10 * 8 + 4 * 2 * 2 * 16) + (2 * 10 * 10 + 4 * 2 * 2 * 25) + 12 * (4 * 3 + 4) == 2040
    assert short_prompts.flops_trl == 3 * (2 * 10 * 8 + 4 * 2 * 2 * 16) + (2 * 10 * 10 + 4 * 2 * 2 * 25) + 12 * (3 * 8 + 10) == 2256


def test_reward_rows_say_what_each_side_ran_and_read_the_bound_as_the_target():
    from benchmarks.bench_bounds import Bounds
    from benchmarks.bench_reward import OURS, PEER, table_rows

    results = {"ours-reward": {"tokens_per_s": 6_000.0, "peak_rss_mib": 500.0},
               "trl-reward": {"tokens_per_s": 2_000.0, "peak_rss_mib": 750.0}}
    limits = Bounds(real_tokens=150, shared_tokens=110, prompt_tokens=80, padded_tokens_ours=120, padded_tokens_trl=200,
                    flops_ours=2.5e9, flops_trl=5e9, flops_ours_computed=2e9)
    speed, memory, tokens, flops, computed = table_rows("hh", results, limits, row)
    assert speed["stage"] == memory["stage"] == "train reward model [hh], no checkpointing either side"
    assert OURS in speed["metric"] and "prefix-shared" in OURS and speed["peer_name"] == PEER and "RewardTrainer" in PEER
    assert (speed["ratio"], speed["target"]) == (3.0, "≥ 2.00× (FLOP bound of the layout)")
    assert (memory["ratio"], memory["target"]) == (1.5, "≤ TRL")
    assert tokens["ratio"] == 200 / 120 and (flops["ours"], flops["peer"], flops["ratio"]) == (2.5, 5.0, 2.0)
    assert "last layer at the scored tokens" in computed["metric"] and (computed["ours"], computed["ratio"]) == (2.0, 2.5)


def test_trl_reward_rows_are_prompt_plus_answer_ids_of_our_shards(monkeypatch):
    from benchmarks import bench_reward

    ids = {"prompt_ids": [[1, 2], [3]], "chosen_ids": [[4], [5, 6]], "rejected_ids": [[7, 8], [9]]}
    monkeypatch.setattr(bench_reward, "trl_token_ids", lambda shards: ids)
    assert bench_reward.trl_rows(None) == {"chosen": [[1, 2, 4], [3, 5, 6]], "rejected": [[1, 2, 7, 8], [3, 9]]}


def test_peak_rss_is_the_childs_own_not_the_parents_it_inherits():
    """A parent whose peak is 300 MiB starts two children: one allocating nothing, one 100 MiB.
    ru_maxrss reports the parent's 300 MiB in both (what every HH train variant showed); the
    children's own peaks are theirs."""
    import subprocess
    import sys
    from pathlib import Path

    child = ("import resource, sys; from benchmarks.process_memory import peak_rss_mib\n"
             "held = bytearray(int(sys.argv[1]) * 2**20); held[::4096] = b'x' * len(held[::4096])\n"
             "print(peak_rss_mib(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
    parent = ("import subprocess, sys\n"
              "peak = bytearray(300 * 2**20); peak[::4096] = b'x' * len(peak[::4096]); del peak\n"
              f"for mib in (0, 100): print(subprocess.run([sys.executable, '-c', {child!r}, str(mib)], capture_output=True,"
              " text=True, check=True).stdout, end='')")
    done = subprocess.run([sys.executable, "-c", parent], capture_output=True, text=True, check=True,
                          cwd=Path(__file__).resolve().parents[1])
    (idle, idle_inherited), (busy, busy_inherited) = (map(float, line.split()) for line in done.stdout.splitlines())
    assert idle_inherited >= 300 and busy_inherited >= 300  # the trap: ru_maxrss carries the parent's peak
    assert idle < 100 and 100 <= busy < 200


def test_mfu_counts_the_same_model_flops_per_real_token_on_both_sides():
    """Ours 4,000 real tokens/s (3,000 computed: the shared prompt once), TRL 1,000: the MFU ratio
    is the tokens/s ratio, and the computed-token figure is its own row."""
    train = {"ours": {"tokens_per_s": 4_000.0, "computed_tokens_per_s": 3_000.0}, "trl-precompute": {"tokens_per_s": 1_000.0}}
    real, computed = mfu_rows("train [hh]", params=1_000_000, matmul_flops=1e11, train=train)
    assert (real["ours"], real["peer"], real["ratio"]) == (6e6 * 4_000 / 1e11, 6e6 * 1_000 / 1e11, 4.0)
    assert computed["ours"] == 6e6 * 3_000 / 1e11 and computed["peer"] is None


def test_neardup_peers_compare_prefdatas_comparison_text():
    """A contraction and the punctuation are what curate's comparison text folds away: on the raw
    folded texts ("user: what's … france?") the peers' word sets share 3 of 10 words."""
    from benchmarks.bench_neardup import datasketch_labels, rensa_labels
    from tests.test_neardup import fold_as_curate

    folded = fold_as_curate(["What's the capital of France?", "what is the capital of france", "Tell me a joke"])
    for labels in (datasketch_labels(folded), rensa_labels(folded)):
        assert labels.tolist() == [0, 0, 2]


def test_neardup_peers_band_their_lsh_for_the_threshold():
    """Twenty pairs at word Jaccard 0.905 (19 shared words of 21), above the 0.8 threshold: banded
    for 0.8, both peers find every one (8 bands of 16 rows, rensa's earlier layout, proposes a
    pair at this Jaccard only 83% of the time)."""
    from benchmarks.bench_neardup import datasketch_labels, rensa_labels
    from tests.test_neardup import fold_as_curate

    texts = []
    for pair in range(20):
        shared = " ".join(f"p{pair}w{k}" for k in range(19))
        texts += [f"{shared} p{pair}a", f"{shared} p{pair}b"]
    for labels in (datasketch_labels(fold_as_curate(texts)), rensa_labels(fold_as_curate(texts))):
        assert (labels[0::2] == labels[1::2]).all() and len(set(labels.tolist())) == 20


def test_reviewed_pairs_score_a_methods_merges_against_the_readers_labels():
    from benchmarks.bench_neardup import reviewed_pairs, reviewed_scores

    pairs = reviewed_pairs()
    duplicates = sum(p["duplicate"] for p in pairs)
    assert 0 < duplicates < len(pairs)  # both labels, so precision and recall both mean something
    assert reviewed_scores(lambda folded: [0] * len(folded), pairs) == (duplicates / len(pairs), 1.0)
    assert reviewed_scores(lambda folded: list(range(len(folded))), pairs) == (0.0, 0.0)


def test_realistic_curate_prompts_run_from_one_word_up_and_repeat_like_chat(realdata, tmp_path):
    """Real chat prompts resampled with edits: one-word prompts among them, most prompts new, and
    the rest repeats, near-duplicates and duplicate pairs (uniform prompts have none this short)."""
    import pyarrow.parquet as pq

    from benchmarks.bench_curate import _folded, generate_realistic, real_pool

    pool = real_pool(tmp_path)
    assert pool.repeat_rate[True] > pool.repeat_rate[False]  # "Thanks." recurs, long requests do not
    generate_realistic(tmp_path / "records", 3_000, pool)
    prompts = pq.read_table(tmp_path / "records" / "records.parquet", columns=["prompt"])["prompt"].to_pylist()
    words = [len(_folded(p).split()) for p in prompts]
    assert min(words) == 1 and 0.03 < sum(w <= 4 for w in words) / len(words) < 0.3
    assert 0.7 < len({_folded(p) for p in prompts}) / len(prompts) < 0.95
