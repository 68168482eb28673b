"""`python -m app.run`'s supervisor: the restart policy as pure logic, and the loop on trivial children."""

from __future__ import annotations

import os
import sys

from app.run import Child, RestartPolicy, supervise


def test_backoff_doubles_to_the_cap_and_gives_up_on_the_fifth_exit_within_the_window():
    p = RestartPolicy()
    # a child that dies at once, each restart after the delay asked for: 1, 2, 4, 8, then give up
    t, delays = 0.0, []
    for _ in range(5):
        d = p.on_exit(t, started_at=t)
        delays.append(d)
        if d is None:
            break
        t += d
    assert delays == [1, 2, 4, 8, None]


def test_backoff_caps_at_30_s_when_exits_are_spread_out():
    p = RestartPolicy()
    t, delays = 0.0, []
    for _ in range(8):
        delays.append(p.on_exit(t, started_at=t - 20))  # ran 20 s each time: under the window
        t += delays[-1] + 20
    assert delays == [1, 2, 4, 8, 16, 30, 30, 30]


def test_a_child_that_stayed_up_for_the_window_starts_a_new_streak():
    p = RestartPolicy()
    assert [p.on_exit(t, started_at=t) for t in (0, 1, 3)] == [1, 2, 4]
    assert p.on_exit(500, started_at=400) == 1  # up 100 s: the earlier exits are forgiven
    assert p.exits == [500]


def test_exits_older_than_the_window_do_not_count():
    p = RestartPolicy(max_exits=3, window_s=10)
    assert p.on_exit(0, 0) == 1 and p.on_exit(5, 4) == 2
    assert p.on_exit(11, 9) is not None  # the exit at 0 left the window
    assert p.on_exit(12, 12) is None  # 5, 11, 12: three within 10 s


def _fast() -> RestartPolicy:
    return RestartPolicy(base_delay_s=0.01, max_delay_s=0.05)


def test_supervise_restarts_then_gives_up_and_stops_the_other_child(capsys):
    flaky = Child("flaky", [sys.executable, "-c", "import sys; sys.exit(3)"], _fast())
    steady = Child("steady", ["sleep", "30"], _fast())
    assert supervise([flaky, steady], dict(os.environ), lambda: False, poll_s=0.01) == 1
    err = capsys.readouterr().err
    assert err.count("flaky exited (3); restarting in") == 4 and err.count("flaky restarted (pid") == 4
    assert "flaky exited (3), 5 times within 60 s; stopping" in err
    assert steady.proc.returncode == -15 and "steady restarted" not in err


def test_supervise_stops_on_request_with_0():
    calls = {"n": 0}

    def should_stop():
        calls["n"] += 1
        return calls["n"] > 5

    c = Child("sleeper", ["sleep", "30"], _fast())
    assert supervise([c], dict(os.environ), should_stop, poll_s=0.01) == 0
    assert c.proc.returncode == -15
