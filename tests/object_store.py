"""A real ``gs://`` object store on 127.0.0.1 for tests: gcp-storage-emulator in its own process.

Every client a run uses is pointed at it by environment variables, and none may look for real
credentials or the cloud metadata server, so no request leaves this machine:

- orbax's tensorstore ``gcs`` kvstore: ``TENSORSTORE_GCS_HTTP_URL`` (the endpoint) and
  ``GOOGLE_AUTH_TOKEN_FOR_TESTING`` (a fixed bearer token instead of credential discovery);
- ``etils.epath`` (through fsspec's ``gcsfs``): ``STORAGE_EMULATOR_HOST``, ``FSSPEC_GCS_TOKEN=anon``,
  and ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false`` (its bucket-type probe is gRPC, which the
  emulator does not speak, and would wait 60 s a call);
- ``google-cloud-storage`` (orbax's bucket check, tensorboardX's ``gs://`` writer):
  ``STORAGE_EMULATOR_HOST`` (it then uses anonymous credentials);
- the metadata server: ``NO_GCE_CHECK=true`` and ``GCE_METADATA_HOST`` / ``GCE_METADATA_IP`` /
  ``GCE_METADATA_ROOT`` on a closed 127.0.0.1 port, in case anything still asks.

Use the ``gcs`` fixture (import it into the test module: ``from object_store import gcs,
gcs_server``) or ``with gcs_emulator(tmp) as gcs:``. ``gcs.env`` is the environment for
subprocesses, ``gcs.url("run")`` is ``gs://<bucket>/run``. The fixture gives each test a fresh
bucket on one emulator per session and also sets the variables in this process, so in-process
epath/orbax calls reach the emulator.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest

BUCKET = "ftjax-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def client_env(endpoint: str) -> dict[str, str]:
    """The variables that point tensorstore, gcsfs and google-cloud-storage at ``endpoint`` and
    turn off every way of finding real credentials."""
    closed = f"127.0.0.1:{_free_port()}"  # nothing listens there once the probe socket is closed
    return {
        "TENSORSTORE_GCS_HTTP_URL": endpoint,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
        "STORAGE_EMULATOR_HOST": endpoint,
        "FSSPEC_GCS_TOKEN": "anon",
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        "GOOGLE_CLOUD_PROJECT": "ftjax-test",
        "NO_GCE_CHECK": "true",
        "GCE_METADATA_HOST": closed,
        "GCE_METADATA_IP": closed,
        "GCE_METADATA_ROOT": closed,
    }


@dataclasses.dataclass
class GcsEmulator:
    endpoint: str  # http://127.0.0.1:PORT
    bucket: str
    env: dict[str, str]  # os.environ plus client_env(endpoint): for subprocesses
    log: Path  # the emulator's own output

    def url(self, *parts: str) -> str:
        return "/".join([f"gs://{self.bucket}", *parts])

    def buckets(self) -> list[str]:
        import json
        with urllib.request.urlopen(f"{self.endpoint}/storage/v1/b?project=ftjax-test", timeout=10) as r:
            return [item["name"] for item in json.load(r).get("items", [])]

    def objects(self, prefix: str = "") -> list[str]:
        """Names of the objects under ``prefix``, straight from the emulator's JSON API."""
        import json
        from urllib.parse import quote
        names, token = [], ""
        while True:
            q = f"prefix={quote(prefix)}" + (f"&pageToken={quote(token)}" if token else "")
            with urllib.request.urlopen(f"{self.endpoint}/storage/v1/b/{self.bucket}/o?{q}",
                                        timeout=10) as r:
                page = json.load(r)
            names += [item["name"] for item in page.get("items", [])]
            token = page.get("nextPageToken", "")
            if not token:
                return names


def _wait_until_up(endpoint: str, proc: subprocess.Popen, log: Path, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"gcp-storage-emulator exited ({proc.returncode}):\n{log.read_text()}")
        try:
            urllib.request.urlopen(f"{endpoint}/storage/v1/b", timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"gcp-storage-emulator not up at {endpoint} after {timeout}s:\n{log.read_text()}")


@contextlib.contextmanager
def gcs_emulator(workdir: Path, bucket: str = BUCKET) -> Iterator[GcsEmulator]:
    """Start gcp-storage-emulator (in memory) on a free 127.0.0.1 port with ``bucket`` created,
    yield it, and stop it whatever happens. ``workdir`` holds its log (and is its cwd)."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / "gcs_emulator.log"
    for attempt in range(3):  # the port can be taken between picking and binding it
        port = _free_port()
        endpoint = f"http://127.0.0.1:{port}"
        with open(log, "w") as out:
            proc = subprocess.Popen([sys.executable, __file__, str(port), bucket], cwd=workdir,
                                    stdout=out, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
        try:
            _wait_until_up(endpoint, proc, log)
            break
        except RuntimeError:
            _stop(proc)
            if attempt == 2:
                raise
    try:
        yield GcsEmulator(endpoint, bucket, {**os.environ, **client_env(endpoint)}, log)
    finally:
        _stop(proc)


def _die_with_parent() -> None:
    """In the child: SIGTERM when the test process dies, so a killed pytest leaves no emulator."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def create_bucket(endpoint: str, name: str) -> None:
    import json
    req = urllib.request.Request(f"{endpoint}/storage/v1/b?project=ftjax-test", method="POST",
                                 data=json.dumps({"name": name}).encode(),
                                 headers={"Content-Type": "application/json"})
    urllib.request.urlopen(req, timeout=10).close()


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory) -> Iterator[GcsEmulator]:
    """One emulator for the session (tensorstore reads its endpoint once per process); this
    process's environment points at it until the session ends."""
    with gcs_emulator(tmp_path_factory.mktemp("gcs")) as emulator, pytest.MonkeyPatch.context() as mp:
        for k, v in client_env(emulator.endpoint).items():
            mp.setenv(k, v)
        _reset_client_caches()
        yield emulator
    _reset_client_caches()


@pytest.fixture
def gcs(gcs_server, request) -> GcsEmulator:
    """A fresh, empty bucket on the session's emulator, named after the test."""
    name = "t-" + re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:50]
    create_bucket(gcs_server.endpoint, name)
    return dataclasses.replace(gcs_server, bucket=name)


def _reset_client_caches() -> None:
    """Clients read the environment once: fsspec its config at import, gcsfs (cached instances)
    its endpoint when built. Re-read both so in-process gs:// calls see the current variables."""
    try:
        import fsspec.config
        fsspec.config.conf.clear()
        fsspec.config.set_conf_files(fsspec.config.conf_dir, fsspec.config.conf)
        fsspec.config.set_conf_env(fsspec.config.conf)
    except ImportError:
        pass
    try:
        import gcsfs
        gcsfs.GCSFileSystem.clear_instance_cache()
    except ImportError:
        pass


def _serve(port: int, bucket: str) -> None:
    """The emulator's own server, in memory, with one fix: a media download carries the object's
    ``x-goog-generation`` header, as real GCS sends it. Tensorstore reads an object's generation
    from that header and uses it as the condition of its next write (OCDBT's manifest is
    rewritten so several times per checkpoint); without it the write fails with "Malformed
    StorageGeneration". (The emulator ignores write preconditions: one writer at a time here.)"""
    from http import HTTPStatus

    from gcp_storage_emulator import server
    from gcp_storage_emulator.handlers import objects

    plain_download = objects.download

    def download(request, response, storage, *args, **kwargs):
        plain_download(request, response, storage, *args, **kwargs)
        if response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
            obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
            response["x-goog-generation"] = str(obj["generation"])
            response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))

    objects.download = download  # objects.get (GET .../o/NAME?alt=media) calls it by this name
    server.create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket).run()


if __name__ == "__main__":
    _serve(int(sys.argv[1]), sys.argv[2])
