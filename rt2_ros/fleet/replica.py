"""The Ray Serve deployment that hosts one rt2_ros backend with dynamic batching.

Imported only where Ray runs it (the front process deploys it, each replica process runs it); it
needs ``ray[serve]`` (requirements-fleet.txt).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Mapping
from typing import Any

from ray import serve

from rt2_ros.actions import BackendReply, Observation
from rt2_ros.backends.base import BackendError, BackendTimeout

_log = logging.getLogger("rt2_ros.fleet")

# The decorator's sizes are placeholders: __init__ sets the configured ones (fleet.max_batch_size,
# fleet.batch_wait_timeout_s) through Ray Serve's setters, so one class serves any configuration.
_PLACEHOLDER_BATCH = 8
_PLACEHOLDER_WAIT_S = 0.005


class BatchingReplica:
    """One model instance; concurrent calls are answered in batches by ``Backend.infer_batch``.

    A call's answer is its BackendReply, or the BackendError it alone got (returned, not raised,
    so the front re-raises the backend's own error class and message).
    """

    def __init__(self, params: Mapping[str, Any], backend_type: str | None, backend_class: str | None,
                 max_batch_size: int, batch_wait_timeout_s: float) -> None:
        from rt2_ros.serve import build_backend  # the same construction as rt2-serve's

        self._backend, self._backend_type, _ = build_backend(dict(params), backend_type, backend_class)
        self._answer_batch.set_max_batch_size(max_batch_size)
        self._answer_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self._batch_sizes: Counter[int] = Counter()
        self._skipped = 0
        # Set while no batch runs. Ray Serve 2.60's @serve.batch cuts a batch when its wait window ends even
        # while the previous batch still runs (the next one then queues for the model), so under load every
        # batch held only what arrived in one window (~1 call). Calls that arrive during a batch wait here and
        # join the next batch together.
        self._model_free = asyncio.Event()
        self._model_free.set()

    async def infer(self, observation: Observation, timeout_s: float) -> BackendReply | BackendError:
        """Answer one observation within ``timeout_s`` (counted from its arrival here)."""
        deadline = time.monotonic() + timeout_s
        try:
            await asyncio.wait_for(self._model_free.wait(), timeout_s)
        except asyncio.TimeoutError:
            self._skipped += 1
            return BackendTimeout(f"{self._backend_type}: the model stayed busy for the whole {timeout_s:.3f} s budget")
        return await self._answer_batch((observation, deadline))

    def batch_sizes(self) -> dict[int, int]:
        """How many batches of each size this replica ran (batch size -> count)."""
        return dict(self._batch_sizes)

    def skipped(self) -> int:
        """Calls whose deadline had passed before their batch started (answered DEADLINE, not computed)."""
        return self._skipped

    @serve.batch(max_batch_size=_PLACEHOLDER_BATCH, batch_wait_timeout_s=_PLACEHOLDER_WAIT_S)
    async def _answer_batch(self, calls: list[tuple[Observation, float]]) -> list[BackendReply | BackendError]:
        now = time.monotonic()
        results: list[BackendReply | BackendError | None] = [None] * len(calls)
        live = [i for i, (_, deadline) in enumerate(calls) if deadline > now]
        for i in set(range(len(calls))) - set(live):  # computed for nobody: its caller has given up
            self._skipped += 1
            results[i] = BackendTimeout(f"{self._backend_type}: the deadline passed before the batch started")
        if live:
            self._model_free.clear()
            self._batch_sizes[len(live)] += 1
            budget = max(calls[i][1] for i in live) - now
            try:
                # in a thread: the replica's event loop keeps taking calls (they wait for _model_free) meanwhile
                answers = await asyncio.to_thread(self._backend.infer_batch, [calls[i][0] for i in live], budget)
            except BackendError as exc:
                answers = [exc] * len(live)
            except Exception:
                _log.exception("backend %s failed on a batch of %d", self._backend_type, len(live))
                answers = [BackendError(f"{self._backend_type}: unexpected error in the hosted backend; see the "
                                        f"Ray Serve replica log")] * len(live)
            finally:
                self._model_free.set()
            if len(answers) != len(live):
                answers = [BackendError(f"{self._backend_type}: infer_batch answered {len(answers)} results for "
                                        f"{len(live)} observations")] * len(live)
            done = time.monotonic()
            for i, answer in zip(live, answers, strict=True):
                if done > calls[i][1] and not isinstance(answer, BackendError):
                    answer = BackendTimeout(f"{self._backend_type}: a batch of {len(live)} ended "
                                            f"{1000 * (done - calls[i][1]):.0f} ms after this call's deadline")
                results[i] = answer
        return results  # type: ignore[return-value]

    def __del__(self) -> None:
        backend = getattr(self, "_backend", None)
        if backend is not None:
            backend.close()
