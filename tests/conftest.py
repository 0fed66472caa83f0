"""Test-wide settings: small thread pools (2-core CI machines), no network."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(autouse=True, scope="session")
def _quiet_threads():
    # faiss's OpenMP threads spin against torch's on a 2-core machine: one thread is faster here.
    try:
        import faiss

        faiss.omp_set_num_threads(1)
    except ImportError:
        pass
    yield


# ---- nothing skipped for a missing environment
# README's test command runs after `scripts/setup.sh --tests`, which provides every environment a test
# needs (the extras, the PyTriton venv, Chromium). With ZOO_REQUIRE_ALL (set by .ci/run) or CI set, a
# test or module that skips anyway fails instead, so a broken setup cannot hide behind skips; only the
# CUDA tests may skip (no GPU on the CI machines).
REQUIRE_ALL = any(os.environ.get(v, "").strip().lower() not in ("", "0", "false", "no")
                  for v in ("ZOO_REQUIRE_ALL", "CI"))


def _skip_reason(longrepr) -> str:
    return str(longrepr[2]) if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)


def _refuse_skip(rep) -> None:
    if not (REQUIRE_ALL and rep.skipped) or hasattr(rep, "wasxfail"):
        return
    reason = _skip_reason(rep.longrepr)
    if "CUDA" in reason:
        return
    rep.outcome = "failed"
    rep.longrepr = (f"skipped ({reason}), but ZOO_REQUIRE_ALL / CI is set: the environment must be there; "
                    "run scripts/setup.sh --tests")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _refuse_skip(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _refuse_skip(outcome.get_result())
