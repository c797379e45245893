"""Distributed training on 2 gloo processes, started from pytest.

A launch starts ``_scenarios.py`` on two ranks with a timeout, and the tests assert on what both
ranks recorded: the main launch (``torch.distributed.run``, as torchrun) runs every scenario in
one process group, since starting processes and a group costs seconds and a scenario a fraction
of one; each failure scenario is a launch of its own (the group does not survive it), of two
processes given torchrun's environment without a launcher, which would tear the survivor down
before it reports. All launches start together and run side by side.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("_scenarios.py")
MAIN_TIMEOUT = 150  # seconds, the main launch (it shares the machine with the failure launches)
FAILURE_TIMEOUT = 60
FAIL_TIMEOUT = 4.0  # the process group timeout of the failure launches (_scenarios.py)

pytestmark = pytest.mark.timeout(MAIN_TIMEOUT + 30)

Results = dict[int, dict[str, Any]]


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.pop("PYTEST_CURRENT_TEST", None)
    env.update(extra)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Launch:
    """Processes started now, waited for when a test needs their results.

    Each process writes its output to a log file; a thread per process notes when it ended (the
    failure tests measure from a failed rank's exit).
    """

    def __init__(self, what: str, out: Path, commands: list[tuple[list[str], dict[str, str]]]):
        self.what = what
        self.out = out
        self.ended_at: list[float | None] = [None] * len(commands)
        self.procs: list[subprocess.Popen[bytes]] = []
        self._logs: list[Path] = []
        self._threads: list[threading.Thread] = []
        for i, (command, env) in enumerate(commands):
            log = out / f"process{i}.log"
            with open(log, "wb") as f:
                # A session of its own, apart from pytest's terminal (see kill()).
                proc = subprocess.Popen(
                    command,
                    cwd=ROOT,
                    env=env,
                    stdout=f,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )

            self.procs.append(proc)
            self._logs.append(log)
            thread = threading.Thread(target=self._watch, args=(i,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _watch(self, i: int) -> None:
        self.procs[i].wait()
        self.ended_at[i] = time.time()

    @classmethod
    def torchrun(cls, out: Path) -> Launch:
        """The main launch: every scenario, under torchrun (``torch.distributed.run``)."""
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        command += ["--nproc-per-node=2", str(SCRIPT), "all", str(out)]
        return cls("the main launch", out, [(command, _env())])

    @classmethod
    def failure(cls, kind: str, out: Path) -> Launch:
        """Two ranks with torchrun's environment, no launcher (it would stop the survivor)."""
        port = str(_free_port())
        commands = []
        for rank in ("0", "1"):
            env = _env(
                RANK=rank,
                LOCAL_RANK=rank,
                WORLD_SIZE="2",
                LOCAL_WORLD_SIZE="2",
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=port,
            )
            commands.append(([sys.executable, str(SCRIPT), kind, str(out)], env))
        return cls(f"the failure launch {kind!r}", out, commands)

    def kill(self) -> None:
        """Stop whatever still runs of the launch, torchrun's workers included."""
        for proc in self.procs:
            if proc.poll() is None:
                # SIGTERM first: torchrun forwards it to its workers (each in a session of its
                # own, out of reach of a signal to torchrun's group) and waits for them.
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    @property
    def log(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in self._logs if p.exists())

    def wait(self) -> tuple[Results, list[int]]:
        timeout = MAIN_TIMEOUT if len(self.procs) == 1 else FAILURE_TIMEOUT
        self._threads[0].join(timeout)
        if "alive" in self.what and self.procs[1].poll() is None:
            self.procs[1].terminate()  # it lived on long enough: rank 0 has reported
        for thread in self._threads:
            thread.join(timeout)
        if any(proc.poll() is None for proc in self.procs):
            self.kill()
            pytest.fail(f"{self.what} did not end within {timeout} s:\n{self.log[-6000:]}")
        results: Results = {}
        for rank in (0, 1):
            path = self.out / f"rank{rank}.json"
            if not path.exists():
                pytest.fail(
                    f"{self.what}: rank {rank} wrote no results; output:\n{self.log[-6000:]}"
                )
            results[rank] = json.loads(path.read_text())
        return results, [int(proc.returncode) for proc in self.procs]


@pytest.fixture(scope="module")
def launches(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Launch]]:
    """Every launch, started at once: they mostly wait (for imports, rendezvous, timeouts), so
    running them side by side takes about as long as the longest."""
    started = {"all": Launch.torchrun(tmp_path_factory.mktemp("ddp-all"))}
    for kind in ("raise", "kill", "alive", "teardown"):
        started[kind] = Launch.failure(kind, tmp_path_factory.mktemp(f"ddp-{kind}"))
    try:
        yield started
    finally:
        for launch in started.values():
            launch.kill()


@pytest.fixture(scope="module")
def ran(launches: dict[str, Launch]) -> Results:
    """The main launch's results (every scenario of both ranks), once it has ended."""
    results, codes = launches["all"].wait()
    for rank, scenarios in results.items():
        for name, result in scenarios.items():
            if isinstance(result, dict) and "traceback" in result:
                pytest.fail(f"rank {rank}, scenario {name!r}:\n{result['traceback']}")
    assert codes == [0], launches["all"].log[-6000:]
    return results


def both(results: Results, scenario: str) -> tuple[dict[str, Any], dict[str, Any]]:
    return results[0][scenario], results[1][scenario]


# -- the process group -----------------------------------------------------------------------------


def test_group_created_from_torchrun_env_reused_and_destroyed_by_its_creator(
    ran: Results,
) -> None:
    for rank, scenarios in ran.items():
        group = scenarios["group"]
        assert group["created"]
        assert group["reused"]
        assert (group["rank"], group["world"]) == (rank, 2)
        assert group["describe"].startswith(f"strategy: DDP, rank {rank} of 2 (gloo)")
        assert scenarios["closed"] == {"created": True, "initialized": False}


# -- same results as a hand-written DDP loop -------------------------------------------------------


@pytest.mark.parametrize("launch", ["asyncio", "trio"])
def test_weights_bit_identical_to_a_raw_ddp_loop(launch: str, ran: Results) -> None:
    key = "raw_equal" if launch == "asyncio" else "raw_equal@trio"
    for rank in (0, 1):
        raw = ran[rank][key]
        assert raw["inline"], raw
        assert raw["thread"], raw
        assert raw["producer"], raw
        assert raw["inline_hops"] == 0
        assert raw["thread_hops"] > 0


def test_within_1e6_of_one_process_on_the_combined_batches(ran: Results) -> None:
    assert ran[0]["raw_equal"]["one_process_max_diff"] <= 1e-6


def test_shards_are_disjoint_and_reshuffled_every_epoch(ran: Results) -> None:
    seen = [ran[r]["shards"]["seen"] for r in (0, 1)]
    for epoch in ("0", "1"):
        mine, theirs = seen[0][epoch], seen[1][epoch]
        assert not set(mine) & set(theirs)
        assert sorted(mine + theirs) == list(range(96))
    assert seen[0]["0"] != seen[0]["1"]  # set_epoch: another order in the next epoch


def test_gradient_accumulation_with_no_sync_matches_the_raw_loop(ran: Results) -> None:
    assert ran[0]["accumulate"]["equal"]
    assert ran[1]["accumulate"]["equal"]


def test_a_one_rank_skip_inside_an_accumulation_group_keeps_the_ranks_paired(
    ran: Results,
) -> None:
    for result in both(ran, "accumulate_skips"):
        for where in ("first", "last"):
            assert result[where]["equal"], where
    steps = {r[w]["step"] for r in both(ran, "accumulate_skips") for w in ("first", "last")}
    assert len(steps) == 1


# -- every rank takes the same control flow --------------------------------------------------------


@pytest.mark.parametrize("launch", ["asyncio", "trio"])
def test_a_stop_on_one_rank_stops_every_rank_at_the_same_step(launch: str, ran: Results) -> None:
    r0, r1 = both(ran, "stop_one_rank" + ("@trio" if launch == "trio" else ""))
    # Rank 0's StopEpoch at step 2 ended epoch 1 at the agreement at step 4 on both ranks;
    # rank 1's StopFit at step 7 stopped both at the agreement at step 8 (agree_every=4).
    assert r0["pass_ends"] == r1["pass_ends"] == [4]
    assert r0["step"] == r1["step"] == 8
    assert r0["reason"] == r1["reason"] == "rank 1: rank-local stop"
    assert r0["equal"]
    assert r1["equal"]


def test_a_time_limit_expiring_on_one_rank_stops_both(ran: Results) -> None:
    r0, r1 = both(ran, "time_limit")
    assert r0["step"] == r1["step"] >= 3
    assert r0["reason"] == r1["reason"]
    assert r0["reason"].startswith("rank 1: time limit")


@pytest.mark.parametrize("launch", ["asyncio", "trio"])
def test_an_outside_cancellation_of_one_rank_is_agreed_and_fit_continues_exactly(
    launch: str, ran: Results
) -> None:
    r0, r1 = both(ran, "cancel" + ("@trio" if launch == "trio" else ""))
    assert r0["cancelled"]
    assert not r1["cancelled"]
    assert r0["step"] == r1["step"] == 6  # the agreement after the cancellation (agree_every=2)
    assert r1["reason"].startswith("rank 0 was cancelled")
    assert r0["continued_equal"]
    assert r1["continued_equal"]
    # Cancelled as a concurrent validation begins (it hung until the group's timeout).
    assert r1["in_validation_cancelled"]
    for result in (r0, r1):
        assert result["in_validation_equal"]
        cut, straight = result["in_validation_val_loss"]
        assert cut == straight


def test_sigterm_at_different_steps_stops_both_at_the_same_step(ran: Results) -> None:
    r0, r1 = both(ran, "sigterm")
    assert r0["step"] == r1["step"] == 4
    assert r0["reason"] == r1["reason"] == "rank 1: SIGTERM received"
    # The rank that got the signal exits as a terminated process would (143); the other one,
    # stopped before its own signal came, returns.
    assert (r0["code"], r1["code"]) == (None, 143)


@pytest.mark.parametrize("launch", ["asyncio", "trio"])
def test_concurrent_validation_stop_is_agreed(launch: str, ran: Results) -> None:
    r0, r1 = both(ran, "early_stop_concurrent" + ("@trio" if launch == "trio" else ""))
    assert r0["step"] == r1["step"]
    assert r0["reason"] == r1["reason"]
    assert "early stopping" in r0["reason"]


def test_a_best_file_judged_by_a_concurrent_validation_is_written_without_a_hang(
    ran: Results,
) -> None:
    r0, r1 = both(ran, "best_concurrent")
    assert r0["step"] == r1["step"] == 24
    assert r0["best"] == 1  # written by rank 0
    # Resumed from the best epoch's weights on every rank, then trained to epoch 5.
    assert r0["resumed_step"] == r1["resumed_step"] == 30
    assert r0["equal"]
    assert r0["warnings"] == r1["warnings"] == []


def test_data_ending_early_on_one_rank_ends_the_pass_on_every_rank(ran: Results) -> None:
    r0, r1 = both(ran, "uneven_data")
    assert r0["sized_step"] == r1["sized_step"] == 14  # 7 batches (the fewest) an epoch
    assert r0["unsized_step"] == r1["unsized_step"] == 6  # 3 an epoch, agreed batch by batch
    assert r0["sized_equal"]
    assert r0["unsized_equal"]


def test_a_one_rank_skip_before_the_gradient_keeps_ranks_in_step(ran: Results) -> None:
    r0, r1 = both(ran, "skips")
    assert (r0["before_fired"], r1["before_fired"]) == (0, 1)
    assert r0["before_equal"]
    assert r1["before_equal"]


def test_a_one_rank_skip_after_the_gradient_is_a_distributed_error(ran: Results) -> None:
    for result in both(ran, "skips"):
        error = result["after"]
        assert error is not None
        assert error["peer"] == 1
        assert error["step"] == 4
        assert "optimizer updates differ (rank 0: 4, rank 1: 3)" in error["message"]


def test_a_collective_from_concurrent_callbacks_names_them(ran: Results) -> None:
    for result in both(ran, "guard"):
        assert result["callbacks"] == ["A", "B"]
        assert "declare `collectives = True`" in result["raised"][0]


def test_ranks_that_make_their_learners_differently_are_told_alike_at_once(ran: Results) -> None:
    r0, r1 = both(ran, "settings")
    for result in (r0, r1):
        assert "agree_every (rank 0: 2, rank 1: 3)" in result["agree_every"]
        assert (
            "model parameter '0.weight' (rank 0: '(6, 8) float32', rank 1: '(8, 8) float32')"
            in (result["model"])
        )
        assert (
            "the callbacks (rank 0: ('Metrics',), rank 1: ('Metrics', 'EarlyStopping'))"
            in (result["callbacks"])
        )
        assert (
            "the callbacks (rank 0: ('Metrics', 'Recorder'), rank 1: ('Recorder', 'Metrics'))"
            in (result["order"])
        )
        assert "train_data's batch_size (rank 0: 8, rank 1: 4)" in result["batch size"]
        assert (
            "train_data's sampler (rank 0: 'RandomSampler', rank 1: 'SequentialSampler')"
            in result["shuffle"]
        )
        assert result["step after"] == 6
        assert result["callbacks from a generator"] == ["Metrics"]
    # The same message on both ranks but for the rank it names.
    assert r0["model"].replace("rank 0 of", "rank 1 of") == r1["model"]


# -- checkpoints, metrics --------------------------------------------------------------------------


def test_checkpoints_rank0_writes_every_ranks_state_and_resume_is_exact(
    ran: Results,
) -> None:
    r0, r1 = both(ran, "checkpoint")
    assert r0["writes"] > 0
    assert r1["writes"] == 0
    assert r0["ranks_in_file"] == 2
    assert r0["rngs_differ"]
    for result in (r0, r1):
        assert result["resume_equal"]
        assert result["mid_epoch_equal"]


def test_uneven_validation_shards_match_one_process(ran: Results) -> None:
    r0, r1 = both(ran, "validation")
    for key in ("val_loss", "val_accuracy", "train_loss"):
        assert r0[key] == r1[key]
    assert abs(r0["val_loss"] - r0["one_process_loss"]) <= 1e-6
    assert abs(r0["val_accuracy"] - r0["one_process_accuracy"]) <= 1e-6
    assert abs(r0["concurrent_val_loss"] - r0["val_loss"]) <= 1e-12
    assert r0["concurrent_val_accuracy"] == r0["val_accuracy"]


def test_fsdp_matches_ddp_validates_sequentially_and_resumes(ran: Results) -> None:
    for result in both(ran, "fsdp"):
        assert result["max_diff_vs_ddp"] <= 1e-6
        assert result["val_loss_diff"] <= 1e-6
        assert result["resume_max_diff"] == 0.0
        assert result["plain_resume_max_diff"] == 0.0
        assert result["stale_optimizer_state"] == 0
        assert (
            "parameter groups of [4] parameters, this learner's of [2, 2]"
            in (result["other_groups_refused"])
        )
        straight, resumed = result["plain_lr"]  # (scheduled every step: halved each one)
        assert straight == resumed < 0.1
        # Stopped at step 2, inside a group of 3: the checkpoint warns it cannot hold the group.
        assert result["mid_group_step"] == 2
        assert len(result["mid_group_warnings"]) == 1
        assert "inside an accumulation group under FSDP" in result["mid_group_warnings"][0]


# -- failures --------------------------------------------------------------------------------------


def quotes_rank_1(results: Results, error: str, quoted: str) -> dict[str, Any]:
    """Rank 1 raised ``error``; rank 0 raised a DistributedError quoting it. Rank 0's record."""
    failed, survivor = results[1], results[0]
    assert failed["error"] == error
    assert survivor["error"] == "DistributedError"
    assert survivor["peer"] == 1
    assert quoted in survivor["message"]
    return dict(survivor)


def test_a_rank_raising_then_exiting_ends_the_others_within_2s(
    launches: dict[str, Launch],
) -> None:
    launch = launches["raise"]
    results, codes = launch.wait()
    survivor = quotes_rank_1(results, "ValueError", "ValueError: boom on rank 1")
    exited = launch.ended_at[1]
    assert exited is not None
    assert survivor["raised_at"] - exited < 2.0  # from the failed process's exit
    assert codes == [1, 1]


def test_a_rank_failing_in_teardown_ends_every_rank_with_status_1(
    launches: dict[str, Launch],
) -> None:
    """The other rank gave up on the run's last agreement when rank 1 reported; that collective
    ends only when rank 1 exits. Its process still exits with status 1 (not gloo's abort, which
    would blame it for rank 1's error)."""
    launch = launches["teardown"]
    results, codes = launch.wait()
    quotes_rank_1(results, "ExceptionGroup", "boom on rank 1")
    assert "terminate called" not in launch.log
    assert codes == [1, 1]


def test_a_killed_rank_ends_the_others_within_2s(launches: dict[str, Launch]) -> None:
    results, codes = launches["kill"].wait()
    survivor = results[0]
    assert survivor["error"] == "DistributedError"
    assert "killed" in survivor["message"]
    assert survivor["raised_at"] - results[1]["failed_at"] < 2.0  # killed right after noting it
    assert codes[0] == 1
    assert codes[1] != 0


def test_a_failed_rank_that_lives_on_ends_the_others_within_the_timeout(
    launches: dict[str, Launch],
) -> None:
    results, codes = launches["alive"].wait()
    survivor = quotes_rank_1(results, "ValueError", "ValueError: boom on rank 1")
    assert survivor["raised_at"] - results[1]["failed_at"] < FAIL_TIMEOUT + 1.0
    assert codes[0] == 1


# -- the page and the example ----------------------------------------------------------------------


def test_the_distributed_page_runs_on_two_ranks(ran: Results) -> None:
    for result in both(ran, "docs"):
        assert result["blocks"] == 5
        assert result["has_callback"]


def test_the_digits_example_learns_and_resumes(ran: Results) -> None:
    r0, r1 = both(ran, "example")
    assert (r0["accuracy"], r0["resumed_accuracy"]) == (r1["accuracy"], r1["resumed_accuracy"])
    assert r0["accuracy"] > 0.7  # two epochs
    assert r0["resumed_accuracy"] > r0["accuracy"]  # a third, continued from last.pt
