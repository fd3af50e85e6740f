"""The console's pure logic: sessions and CSRF tokens, what a page shows (no servers)."""

from __future__ import annotations

import time

from edgeloop.console import views
from edgeloop.console.app import _safe_next
from edgeloop.console.sessions import Sessions


def test_a_session_knows_its_csrf_token_and_its_roles_capabilities() -> None:
    sessions = Sessions(60)
    sid, session = sessions.open("elt_token", "vera", "viewer")
    assert sessions.get(sid) is session
    assert session.csrf_ok(session.csrf)
    assert not session.csrf_ok(None)
    assert not session.csrf_ok("")
    assert not session.csrf_ok(session.csrf + "x")
    assert not session.may("rollouts.write")
    assert sessions.open("t", "olga", "operator")[1].may("rollouts.write")
    assert sessions.get("not-a-session") is None
    sessions.close(sid)
    assert sessions.get(sid) is None


def test_a_session_ends_when_it_expires() -> None:
    sessions = Sessions(60)
    sid, session = sessions.open("elt_token", "vera", "viewer")
    session.expires = time.monotonic() - 1
    assert sessions.get(sid) is None


def test_after_sign_in_only_a_local_path() -> None:
    assert _safe_next("/rollouts/1?done=x") == "/rollouts/1?done=x"
    assert _safe_next("//evil.example/x") == "/"
    assert _safe_next("https://evil.example/") == "/"
    assert _safe_next(None) == "/"


def test_buttons_follow_the_rollouts_state() -> None:
    assert views.actions_for("awaiting_approval") == ["approve"]
    assert views.actions_for("running") == ["pause", "abort", "rollback"]
    assert views.actions_for("paused") == ["resume", "abort", "rollback"]
    assert views.actions_for("completed") == ["rollback"]
    assert views.actions_for("rolled_back") == []


def test_wave_rows_take_live_progress_over_the_stored_counts() -> None:
    rollout = {
        "current_wave": 1,
        "wave_status": [
            {"wave": 0, "state": "succeeded", "size": 1, "converged": 1, "failed": 0},
            {
                "wave": 1,
                "state": "converging",
                "size": 4,
                "members": 3,
                "converged": 0,
                "failed": 0,
                "live": {"converged": 2, "failed": 1, "pending": 0},
                "budget": 1,
                "verdict_reasons": ["error rate 0.2 > baseline 0.01"],
            },
        ],
    }
    first, second = views.wave_rows(rollout)
    assert (first["targeted"], first["converged"], first["current"]) == (1, 1, False)
    assert (second["targeted"], second["converged"], second["failed"]) == (3, 2, 1)
    assert second["current"]
    assert second["verdict_reasons"] == ["error rate 0.2 > baseline 0.01"]


def test_the_waterfall_puts_children_under_their_parent_on_the_traces_time_line() -> None:
    trace = {
        "processes": {"p1": {"serviceName": "registry"}, "p2": {"serviceName": "gateway"}},
        "spans": [
            {"spanID": "c", "operationName": "activate on d1", "processID": "p2",
             "startTime": 3000, "duration": 1000,
             "references": [{"refType": "CHILD_OF", "spanID": "a"}]},
            {"spanID": "a", "operationName": "register m", "processID": "p1",
             "startTime": 1000, "duration": 500, "references": []},
            {"spanID": "b", "operationName": "orphan", "processID": "p1",
             "startTime": 2000, "duration": 100,
             "references": [{"refType": "CHILD_OF", "spanID": "gone"}]},
        ],
    }  # fmt: skip
    bars, length = views.waterfall(trace)
    assert [(b.name, b.depth, b.service) for b in bars] == [
        ("register m", 0, "registry"),
        ("activate on d1", 1, "gateway"),
        ("orphan", 0, "registry"),
    ]
    assert length == 3.0  # ms, from the first start to the last end
    assert bars[0].left == 0
    assert bars[1].left + bars[1].width == 1.0


def test_psi_series_per_feature_of_one_group_oldest_first() -> None:
    def window(group: str, minute: int, psi: float, evaluated: bool = True) -> dict[str, object]:
        return {
            "group": group,
            "window_start": f"2026-01-01T00:{minute:02d}:00+00:00",
            "window_end": f"2026-01-01T00:{minute + 1:02d}:00+00:00",
            "evaluated": evaluated,
            "scores": {"features": {"f0": {"psi": psi}}, "kpis": {"error_rate": psi / 10}},
        }

    windows = [
        window("b", 1, 0.9),
        window("a", 2, 0.3),
        window("a", 1, 0.1),
        window("a", 3, 0.5, False),
    ]
    groups, series = views.psi_series(windows, None)
    assert groups == ["a", "b"]
    assert [v for _, v in series["f0"]] == [0.1, 0.3]
    _, series = views.psi_series(windows, "b")
    assert [v for _, v in series["f0"]] == [0.9]
    assert views.latest_kpis(windows) == {"error_rate": 0.03}
