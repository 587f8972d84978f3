"""A live gpuqd (and, where a test asks, worker test doubles) for the client tests.

GPUQ_BIN names the folder holding gpuqd and gpuq-fake-worker (build/bin).
GPUQ_TEST_INSTALLED=1 tests the installed gpuq instead of the source tree
next to this folder (which then need not exist: copy the tests anywhere);
GPUQ_VERSION_FILE and GPUQ_GOLDEN_DIR name the repository's VERSION and
schema/golden when the tests are not in it.
"""

import json
import os
import subprocess
import sys
import tempfile
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.dirname(HERE)                          # clients/python
INSTALLED = os.environ.get("GPUQ_TEST_INSTALLED") == "1"
if not INSTALLED:
    sys.path.insert(0, SOURCE)

import gpuq  # noqa: E402

ROOT = os.path.abspath(os.path.join(SOURCE, "..", ".."))
BIN = os.environ.get("GPUQ_BIN", os.path.join(ROOT, "build", "bin"))
VERSION_FILE = os.environ.get("GPUQ_VERSION_FILE", os.path.join(ROOT, "VERSION"))
GOLDEN_DIR = os.environ.get("GPUQ_GOLDEN_DIR", os.path.join(ROOT, "schema", "golden"))


class Service:
    def __init__(self, folder):
        self.folder = folder
        self.client_endpoint = "ipc://%s/c.sock" % folder
        self.worker_endpoint = "ipc://%s/w.sock" % folder
        self.log = open(os.path.join(folder, "gpuqd.log"), "ab")
        ready = os.path.join(folder, "ready.json")
        self.broker = subprocess.Popen(
            [os.path.join(BIN, "gpuqd"), "--listen", self.client_endpoint,
             "--worker-listen", self.worker_endpoint, "--store", folder + "/jobs.db",
             "--cache", folder + "/kernels.db", "--workers", "0", "--heartbeat-ms", "1000",
             "--max-queued-per-tenant", "50", "--ready-file", ready,
             "--session-bin", os.path.join(BIN, "gpuq-fake-session")],
            stdout=self.log, stderr=self.log)
        self.workers = []
        for _ in range(200):
            if os.path.exists(ready):
                self.ready = json.load(open(ready))
                return
            time.sleep(0.02)
        raise RuntimeError("gpuqd did not start")

    def add_worker(self, *args):
        self.workers.append(subprocess.Popen(
            [os.path.join(BIN, "gpuq-fake-worker"), "--broker", self.worker_endpoint,
             # 1 s both ways: on a loaded machine a worker silent for 3 x 100 ms
             # was declared lost, and a job on a region then never ran in time.
             "--heartbeat-ms", "1000"] + list(args), stdout=self.log, stderr=self.log))
        with gpuq.Client(self.client_endpoint) as c:
            for _ in range(200):
                if len(c.devices()) == len(self.workers):
                    return
                time.sleep(0.02)
        raise RuntimeError("worker did not register")

    def stop(self):
        for p in self.workers + [self.broker]:
            p.kill()
            p.wait()
        self.log.close()


@pytest.fixture
def service():
    with tempfile.TemporaryDirectory() as folder:
        s = Service(folder)
        try:
            yield s
        finally:
            s.stop()
