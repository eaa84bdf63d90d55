"""Fuzz every operation of the OpenAPI document with schemathesis (valid and invalid requests), bounded
in time: no answer may be a 5xx, and every answer must be one the document lists for the operation,
with the documented content type and body schema.

The budget is ``LIKENESS_FUZZ_BUDGET_S`` seconds (default 20); generation is derandomized, so a run
is reproducible and a failure names the request (as a curl command) that caused it.
"""

from __future__ import annotations

import os
import time

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given
from hypothesis import settings as hypothesis_settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

BUDGET_S = float(os.environ.get("LIKENESS_FUZZ_BUDGET_S", "20"))
EXAMPLES = int(os.environ.get("LIKENESS_FUZZ_EXAMPLES", "12"))
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture
def fuzzed_app(settings):
    """A separate app instance (its own lifespan), fuzzed with an admin key so every route is reachable."""
    from app.main import create_app

    return create_app(settings)


def _fuzz(operation, mode: GenerationMode, deadline: float, headers: dict[str, str], calls: dict[str, int],
          failures: dict[str, str]) -> None:  # noqa: ANN001
    """Up to ``EXAMPLES`` requests of ``mode`` for ``operation`` until ``deadline``; the first failure is kept."""

    @given(case=operation.as_strategy(generation_mode=mode))
    @hypothesis_settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                         phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    def fuzz(case) -> None:  # noqa: ANN001
        if time.monotonic() > deadline or operation.label in failures:
            return
        calls[operation.label] = calls.get(operation.label, 0) + 1
        response = case.call(headers=headers)
        try:
            case.validate_response(response, checks=CHECKS, headers=headers)
        except (Exception, BaseExceptionGroup) as exc:  # noqa: BLE001 - collected; reported by the test
            failures[operation.label] = f"{type(exc).__name__}: {str(exc)[:1500]}"

    try:
        fuzz()
    except Unsatisfiable:  # nothing invalid can be made of an operation without inputs
        pass


def test_fuzzed_requests_get_no_5xx_and_only_documented_answers(fuzzed_app, admin):
    schema = schemathesis.openapi.from_asgi("/openapi.json", fuzzed_app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 25
    headers = {"Authorization": f"Bearer {admin.key}"}
    end = time.monotonic() + BUDGET_S
    failures: dict[str, str] = {}
    calls: dict[str, int] = {}
    runs = [(op, mode) for op in operations for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)]
    for i, (operation, mode) in enumerate(runs):
        share = max(0.2, (end - time.monotonic()) / (len(runs) - i))  # every operation gets its share of the budget
        _fuzz(operation, mode, time.monotonic() + share, headers, calls, failures)

    print(f"{sum(calls.values())} fuzzed requests over {len(calls)} operations")
    assert set(calls) == {operation.label for operation in operations}, "operations never fuzzed within the budget"
    assert not failures, "\n\n".join(f"{label}\n{problem}" for label, problem in failures.items())
