"""The recording archive on both stores: a folder, and a real S3-compatible server (moto in
server mode), fed from the simulator's recording files through their signed URLs."""

from __future__ import annotations

import io

import pytest

from call_pipeline.clients.recording_store import (
    ArchiveError,
    FileStore,
    RecordingArchive,
    audio_format,
    is_audio,
    open_store,
    recording_key,
    recording_stem,
    url_expired,
)
from call_pipeline_tools.simulator.outboundbot import mp3_bytes, wav_bytes

pytestmark = pytest.mark.usefixtures("aws_test_credentials")




def test_audio_headers():
    assert is_audio(wav_bytes("t")[:12])
    assert is_audio(b"ID3\x04\x00\x00\x00\x00\x00\x00\x00\x00")
    assert is_audio(b"\xff\xfb\x90\x00" + b"\x00" * 8)
    assert not is_audio(b"<?xml version")
    assert not is_audio(b"")
    assert audio_format(wav_bytes("t")[:12]) == "wav"
    assert audio_format(mp3_bytes("t")[:12]) == "mp3"
    assert audio_format(b"\xff\xfb\x90\x64" + b"\x00" * 8) == "mp3"
    assert audio_format(b"RIFF\x00\x00\x00\x00AVI ") is None


def test_expiry_of_signed_urls():
    assert url_expired("http://x/a.wav?Expires=100&Signature=s", now=200)
    assert not url_expired("http://x/a.wav?Expires=300&Signature=s", now=200)
    assert not url_expired("http://x/a.wav", now=200)


def test_keys_are_task_then_call_task():
    assert recording_key(42, "task-1") == "42/task-1.wav"
    assert recording_key(42, "task-1", "mp3") == "42/task-1.mp3"
    assert recording_key(42, "../etc/passwd") == "42/.._etc_passwd.wav"
    assert recording_stem(42, "../etc/passwd") == "42/.._etc_passwd"


def _signed_url(simulator, job_of_task: str = "t-1") -> str:
    return f"{simulator.url}/__recordings/{job_of_task}.wav?Expires=9999999999&Signature=x"


@pytest.mark.parametrize("audio", ["wav", "mp3"])
@pytest.mark.parametrize("kind", ["file", "s3"])
def test_archive_stores_the_recording_and_gives_the_crm_url(kind, audio, tmp_path, s3, simulator_with_recording):
    simulator, task_id = simulator_with_recording
    if audio == "mp3":
        simulator.state._recording_formats[simulator.state.task_to_job[task_id]] = "mp3"
    content = {"wav": wav_bytes, "mp3": mp3_bytes}[audio](task_id)
    if kind == "file":
        store, expected_url = FileStore(tmp_path), (tmp_path / "7" / f"{task_id}.{audio}").as_uri()
    else:
        bucket = s3.new_bucket()
        store = open_store(f"s3://{bucket}/calls", s3.endpoint)
        expected_url = f"s3://{bucket}/calls/7/{task_id}.{audio}"
    archive = RecordingArchive(store)
    stem, key = recording_stem(7, task_id), recording_key(7, task_id, audio)
    assert archive.archived_key(stem) is None
    # the signed URL says .wav; the file's own bytes decide the extension
    url, size = archive.archive(_signed_url(simulator, task_id), stem)
    assert url == expected_url and size == len(content)
    assert archive.archived_key(stem) == key and archive.archived(key)
    assert not archive.archived(recording_key(7, task_id, {"wav": "mp3", "mp3": "wav"}[audio]))
    if kind == "file":
        stored = (tmp_path / key).read_bytes()
    else:
        stored = s3.client().get_object(Bucket=bucket, Key=f"calls/{key}")
        assert stored["ContentType"] == {"wav": "audio/wav", "mp3": "audio/mpeg"}[audio]
        stored = stored["Body"].read()
    assert stored == content
    public = RecordingArchive(store, public_base_url="https://rec.example.com/r/")
    assert public.crm_url(key) == f"https://rec.example.com/r/{key}"


def test_an_error_page_is_not_archived(tmp_path, simulator_with_recording):
    simulator, _ = simulator_with_recording
    archive = RecordingArchive(FileStore(tmp_path))
    with pytest.raises(ArchiveError, match="HTTP 404"):
        archive.archive(_signed_url(simulator, "no-such-task"), "7/x")
    expired = f"{simulator.url}/__recordings/t.wav?Expires=1&Signature=x"
    with pytest.raises(ArchiveError) as info:
        archive.archive(expired, "7/x")
    assert info.value.expired
    assert not list(tmp_path.rglob("*.wav"))


def test_a_recording_over_the_cap_is_refused_and_leaves_nothing(tmp_path, simulator_with_recording):
    simulator, task_id = simulator_with_recording
    archive = RecordingArchive(FileStore(tmp_path), max_bytes=100)
    with pytest.raises(ArchiveError, match="larger than the cap"):
        archive.archive(_signed_url(simulator, task_id), "7/x")
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


def test_file_store_writes_whole_files_only(tmp_path):
    class Broken(io.RawIOBase):
        def readable(self):
            return True

        def readinto(self, buffer):
            raise OSError("connection reset")

    with pytest.raises(OSError):
        FileStore(tmp_path).put("1/a.wav", Broken())
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


@pytest.fixture
def simulator_with_recording(simulator):
    """The simulator with one job whose call attempt has a recording; (simulator, its TaskId)."""
    from call_pipeline_tools.simulator.scenarios import build_job_group

    group = build_job_group("jg-rec", [{"leads_id": 1, "leads_phone": "13700000001", "reference_id": "r1"}],
                            task_id=7, seed=1, status_mix={"Succeeded": 1.0})
    simulator.state.add_job_group(group)
    return simulator, group["jobs"][0]["Tasks"][-1]["TaskId"]
