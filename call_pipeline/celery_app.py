"""The Celery app of the `celery` executor's workers (`call-pipeline worker`): dagster-celery's
task, on the broker and result backend of CALL_PIPELINE_CELERY_BROKER / _BACKEND, listening on the
seed's queues (each with priorities, as the ops' `dagster-celery/priority` tags ask)."""

from __future__ import annotations

from dagster_celery.make_app import make_app
from dagster_celery.tasks import create_task
from kombu import Queue

from call_pipeline.settings import SETTINGS

QUEUES = ("sync_queue", "query_queue", "download_queue", "ai_queue")

app = make_app({"broker": SETTINGS.celery_broker, "backend": SETTINGS.celery_backend,
                "include": ["call_pipeline.definitions"], "config_source": {
                    # one step at a time per worker process: a long step-5 batch does not hold others back
                    "worker_prefetch_multiplier": 1,
                    "task_acks_late": True,
                }})
app.conf.task_queues = [Queue(name, routing_key=f"{name}.#", queue_arguments={"x-max-priority": 10})
                        for name in ("dagster", *QUEUES)]

execute_plan = create_task(app)
