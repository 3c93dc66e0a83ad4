"""The closed-loop load's shared pieces (engine.loadtest), used by `knnssd bench serve` in-process and over HTTP."""

from __future__ import annotations

import threading

from engine.loadtest import Claims, RequestRecord, run_clients, summarize


def test_clients_share_the_requests_each_taken_once():
    """Four clients run at once (each waits at a barrier for the other three before taking work; run one
    after another they would time out there), every request is taken exactly once, and the wall time
    returned covers every client's run."""
    import time

    claims, taken, lock = Claims(50), [], threading.Lock()
    started = threading.Barrier(4, timeout=30)
    spans: list[tuple[float, float]] = []

    def client() -> None:
        t0 = time.perf_counter()
        started.wait()
        while (n := claims.take()) is not None:
            with lock:
                taken.append(n)
        with lock:
            spans.append((t0, time.perf_counter()))

    t_call = time.perf_counter()
    wall = run_clients(client, 4)
    t_back = time.perf_counter()
    assert sorted(taken) == list(range(50)) and len(spans) == 4
    assert max(end for _, end in spans) - t_call <= wall <= t_back - t_call
    assert claims.take() is None


def test_summarize_checks_tokens_only_against_a_reference():
    recs = [RequestRecord(0, 0.0, first_token=0.1, done=1.0, tokens=[1, 2]), RequestRecord(1, 0.0, done=2.0, tokens=[3])]
    assert summarize("m", 2, recs, 2.0, [[1, 2], [3]])["identical"] is True
    assert summarize("m", 2, recs, 2.0, [[1, 2], [4]])["identical"] is False
    row = summarize("m", 2, recs, 2.0, None)
    assert row["identical"] is None and row["tokens"] == 3 and row["agg_tps"] == 1.5


def test_closed_loop_on_a_tiny_engine_sends_every_request_and_matches_solo_plain():
    import torch

    from engine.config import DraftConfig, RuntimeSettings
    from engine.loadtest import closed_loop
    from tests.tiny import tiny_engine

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        eng = tiny_engine()
        prompts = [[5, 6, 7, 8, 5, 6, 7], [9, 10, 11, 9, 10, 11, 9, 10]]
        settings = RuntimeSettings(max_running=4, prefill_chunk=16, prefill_rows=32, calibrate=False)
        plain, _ = closed_loop(eng, prompts, [DraftConfig.plain()] * 2, settings, 1, 2, max_new_tokens=12)
        reference = [next(r.tokens for r in plain if r.prompt_index == i) for i in range(2)]
        spec = [DraftConfig(prompt_lookup=2, max_draft=3)] * 2
        records, wall = closed_loop(eng, prompts, spec, settings, 3, 7, max_new_tokens=12)
    finally:
        torch.set_num_threads(threads)
    assert len(records) == 7 and sorted(r.prompt_index for r in records) == [0, 0, 0, 0, 1, 1, 1]
    assert summarize("batched-spec", 3, records, wall, reference)["identical"] is True
