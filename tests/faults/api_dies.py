"""`python -m tests.faults.api_dies PORT`: an API process (as `uvicorn app.main:create_app`
on 127.0.0.1:PORT) that is SIGKILLed by itself at the worst moment of a registration: its
record written, its ingest job not yet on the stream (issue 13 item 7)."""

from __future__ import annotations

import os
import signal
import sys

import uvicorn

from service.serving.distributed.jobs import IngestJob
from service.serving.distributed.transport import JobQueue

_submit = JobQueue.submit


async def submit(self: JobQueue, job: object, *args: object, **kwargs: object) -> str:
    if isinstance(job, IngestJob):
        os.kill(os.getpid(), signal.SIGKILL)  # after the record, before the XADD
    return await _submit(self, job, *args, **kwargs)  # type: ignore[arg-type]


if __name__ == "__main__":
    JobQueue.submit = submit  # type: ignore[method-assign]
    port = int(sys.argv[1])
    uvicorn.run("app.main:create_app", factory=True, host="127.0.0.1", port=port, log_level="info")
