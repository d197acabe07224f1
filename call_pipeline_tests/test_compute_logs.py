"""The instances' compute log manager (`compute_logs.MirroredComputeLogManager`): a step's output
in the files the UI reads and on the process's own output, as with Dagster's manager, without a
process started for it."""

from __future__ import annotations

import subprocess
import sys
import time

import dagster as dg
import psutil
import yaml
from dagster._core.storage.compute_log_manager import ComputeIOType

from call_pipeline.compute_logs import MirroredComputeLogManager
from call_pipeline.crm.database import PROJECT_ROOT
from call_pipeline_tests.pipeline_harness import project_instance_for_test

COMPUTE_LOGS = {"module": "call_pipeline.compute_logs", "class": "MirroredComputeLogManager"}


def _in_a_process(body: str, path) -> subprocess.CompletedProcess:
    """`body` inside `mirrored(sys.stdout, path)` and `mirrored(sys.stderr, path + ".err")`, in a
    process of its own whose output the test reads (as a run process's output goes to serve's log)."""
    script = (f"import os, subprocess, sys, time\nfrom call_pipeline.compute_logs import mirrored\n"
              f"with mirrored(sys.stdout, {str(path)!r}), mirrored(sys.stderr, {str(path) + '.err'!r}):\n"
              + "".join(f"    {line}\n" for line in body.strip().splitlines())
              + "print('after', flush=True)\n")
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)


def test_what_python_c_and_a_child_write_reaches_the_file_and_the_output(tmp_path):
    path = tmp_path / "step.out"
    done = _in_a_process("""
print("from python", flush=True)
os.write(1, b"from the descriptor\\n")
subprocess.run([sys.executable, "-c", "import sys; print('from a child'); print('child error', file=sys.stderr)"])
""", path)
    expected = "from python\nfrom the descriptor\nfrom a child\n"
    assert path.read_text() == expected
    assert done.stdout == expected + "after\n"
    assert (tmp_path / "step.out.err").read_text() == done.stderr == "child error\n"


def test_a_step_that_left_a_process_holding_its_output_still_ends(tmp_path):
    """A child keeps the step's stdout open for a minute after the step: the mirror lets go soon
    and the step ends; what the child wrote before is in the file and the output."""
    path = tmp_path / "step.out"
    started = time.monotonic()
    done = _in_a_process(f"""
subprocess.Popen([sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"])
while "started" not in open({str(path)!r}).read():
    time.sleep(0.05)
""", path)
    assert time.monotonic() - started < 30  # not the child's minute
    assert path.read_text() == "started\n"
    assert done.stdout.startswith("started\n") and done.stdout.endswith("after\n")


@dg.op
def prints(context) -> list[str]:  # noqa: ANN001 - Dagster reads the annotation, a string here
    print("a line to stdout", flush=True)
    print("a line to stderr", file=sys.stderr, flush=True)
    context.log.info("a log line")
    return [" ".join(child.cmdline()) for child in psutil.Process().children(recursive=True)]


@dg.job(executor_def=dg.in_process_executor)
def printing_job() -> None:
    prints()


def test_a_steps_output_is_in_the_uis_logs_and_no_process_mirrors_it(tmp_path, capfd):
    with project_instance_for_test(temp_dir=str(tmp_path), overrides={"compute_logs": COMPUTE_LOGS}) as instance:
        manager = instance.compute_log_manager
        assert isinstance(manager, MirroredComputeLogManager)
        # without a base_dir, Dagster's own default: the instance's storage/
        assert manager._base_dir == str(tmp_path / "storage")  # noqa: SLF001
        result = printing_job.execute_in_process(instance=instance)
        assert result.success
        # the test process may have children of its own (earlier tests' servers): none mirrors the step
        assert not [command for command in result.output_for_node("prints")
                    if command.startswith("tail -F") or "watch_orphans" in command]
        [key] = manager.get_log_keys_for_log_key_prefix([result.run_id, "compute_logs"], ComputeIOType.STDOUT)
        logs = manager.get_log_data(key)
    assert logs.stdout.decode() == "a line to stdout\n"
    assert "a line to stderr" in logs.stderr.decode() and "a log line" in logs.stderr.decode()
    output = capfd.readouterr()
    assert "a line to stdout" in output.out
    assert "a line to stderr" in output.err


def test_both_instance_files_use_it():
    for path in (PROJECT_ROOT / "dagster.yaml", PROJECT_ROOT / "deploy" / "dagster.yaml"):
        assert yaml.safe_load(path.read_text(encoding="utf-8"))["compute_logs"] == COMPUTE_LOGS, path


def test_off_the_main_thread_it_is_dagsters_own(tmp_path):
    """Runs side by side in one process (a Celery threads pool) keep Dagster's capture: a tail
    process mirrors the step's output there."""
    import threading

    with project_instance_for_test(temp_dir=str(tmp_path), overrides={"compute_logs": COMPUTE_LOGS}) as instance:
        results = []
        thread = threading.Thread(target=lambda: results.append(printing_job.execute_in_process(instance=instance)))
        thread.start()
        thread.join()
        [result] = results
        assert result.success
        assert any(command.startswith("tail -F") for command in result.output_for_node("prints"))
