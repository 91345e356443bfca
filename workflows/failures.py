"""What a failed activity or child workflow says, for reports and status (workflow-safe)."""

from __future__ import annotations

from temporalio.exceptions import ActivityError, ApplicationError, ChildWorkflowError


def failure_message(error: BaseException) -> str:
    """The innermost application error's message: the reason, without Temporal's wrapping."""
    cause: BaseException | None = error
    while isinstance(cause, ActivityError | ChildWorkflowError) and cause.cause is not None:
        cause = cause.cause
    return cause.message if isinstance(cause, ApplicationError) else str(cause)
