"""``dynaip.progress``: the driver-side progress of Ray commands (issue #35), without Ray: the lines a log
gets, and the follower that feeds training's progress from the rows Ray Train's controller appends."""

from __future__ import annotations

import io
import json
import re
import time

from dynaip.progress import JsonlFollower, Progress


def test_without_a_terminal_progress_prints_done_total_rate_eta_and_the_extra_values():
    out = io.StringIO()  # not a TTY: lines, never a bar
    p = Progress("train", 10, "step", every=0.0, stream=out)
    p.update(4, loss=0.123456)
    p.update(advance=1)
    p.close()  # the last line showed the end state already: not printed twice
    p2 = Progress("train", 10, "step", every=3600.0, stream=out)
    p2.update(7)
    p2.close()  # nothing shown since the first update: the end state is printed
    lines = out.getvalue().splitlines()
    assert len(lines) == 3
    assert re.fullmatch(
        r"train: steps 4/10 \(40%\), [0-9.e+-]+ steps/s, ETA \d+:\d\d(:\d\d)?, loss 0\.1235, "
        r"0:\d\d elapsed",
        lines[0],
    ), lines[0]
    assert lines[1].startswith("train: steps 5/10 (50%), ") and "loss 0.1235" in lines[1]  # the last value stays
    assert lines[2].startswith("train: steps 7/10 (70%), ")


def test_lines_come_at_most_every_interval_and_a_disabled_progress_prints_nothing():
    out = io.StringIO()
    p = Progress("precompute", 100, "shard", every=3600.0, stream=out)
    for i in range(1, 50):
        p.update(i)
    assert out.getvalue() == ""  # within the interval: nothing yet
    p.close()
    assert out.getvalue().startswith("precompute: shards 49/100 (49%), ")
    quiet = io.StringIO()
    off = Progress("generate", 3, "case", enabled=False, stream=quiet)
    off.update(3)
    off.close()
    assert quiet.getvalue() == "" and off.done == 3


def test_follower_hands_over_only_the_rows_appended_after_it_started_and_whole_rows_only(tmp_path):
    path = tmp_path / "reported.jsonl"
    path.write_text(json.dumps({"step": 1, "loss": 9.0}) + "\n")  # an earlier run's row: not this run's progress
    seen: list[dict] = []
    with JsonlFollower(path, seen.append, poll=0.01):
        with open(path, "a") as f:
            f.write(json.dumps({"step": 2, "loss": 1.5}) + "\n" + '{"step": 3, "lo')  # a row still being written
            f.flush()
            time.sleep(0.2)
            assert seen == [{"step": 2, "loss": 1.5}]
            f.write('ss": 1.25}\n')
    assert seen == [{"step": 2, "loss": 1.5}, {"step": 3, "loss": 1.25}]


def test_while_nothing_advances_a_log_still_gets_a_line_every_interval(tmp_path):
    """The minutes a Ray Train job spends starting workers and loading models report no step: the follower's
    polls keep the lines coming, with the elapsed time."""
    out = io.StringIO()
    p = Progress("train", 8, "step", every=0.05, stream=out)
    with JsonlFollower(tmp_path / "reported.jsonl", lambda row: None, poll=0.01, on_poll=p.tick):
        time.sleep(0.3)
    lines = out.getvalue().splitlines()
    assert len(lines) >= 2 and all(ln.startswith("train: steps 0/8 (0%), 0 steps/s, ETA ?, ") for ln in lines), lines


def test_rate_and_eta_count_from_the_first_reported_step_not_from_the_start_up():
    out = io.StringIO()
    p = Progress("train", 100, "step", every=0.0, stream=out)
    time.sleep(0.3)  # workers starting: no step
    p.restart_rate(10)  # the first row: step 10 of a resumed run
    time.sleep(0.05)
    p.update(20)
    now = time.perf_counter()
    assert p.rate_t0 - p.t0 >= 0.3
    assert p.rate(now) == 10 / (now - p.rate_t0)  # the 10 steps since the first row, over the time since it
    assert "(20%)" in out.getvalue().splitlines()[-1] and ", 0:00 elapsed" in out.getvalue().splitlines()[-1]
