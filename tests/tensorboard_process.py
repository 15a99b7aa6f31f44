"""A real TensorBoard subprocess on 127.0.0.1 for end-to-end and browser tests."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


class TensorBoard:
    """``python -m tensorboard.main --logdir D --host 127.0.0.1 --port 0`` with extra flags; a context manager."""

    def __init__(self, logdir: Path, *flags: str, timeout: float = 120):
        self.logdir = logdir
        self.flags = flags
        self.timeout = timeout
        self.url = ""
        self._process: subprocess.Popen | None = None
        self._log = logdir.parent / f"tensorboard-{logdir.name}-{abs(hash(flags))}.log"

    def __enter__(self) -> "TensorBoard":
        command = [sys.executable, "-m", "tensorboard.main", "--logdir", str(self.logdir), "--host", "127.0.0.1",
                   "--port", "0", *self.flags]
        self._logfile = open(self._log, "w+")
        self._process = subprocess.Popen(command, stdout=self._logfile, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.time() + self.timeout
        while time.time() < deadline:
            text = self._log.read_text()
            match = re.search(r"(http://127\.0\.0\.1:\d+/\S*)", text)
            if match:
                self.url = match.group(1).rstrip("/")
                return self
            if self._process.poll() is not None:
                raise RuntimeError(f"TensorBoard exited ({self._process.returncode}):\n{text}")
            time.sleep(0.2)
        self.__exit__()
        raise RuntimeError(f"TensorBoard did not start in {self.timeout} s:\n{self._log.read_text()}")

    def __exit__(self, *exc) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self._process.kill()
        self._logfile.close()

    @property
    def output(self) -> str:
        return self._log.read_text()

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=60) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()

    def json(self, path: str):
        status, body = self.get(path)
        assert status == 200, (path, status, body[:500])
        return json.loads(body)

    def wait_for(self, path: str, predicate, timeout: float = 60):
        """Poll a JSON route until ``predicate(payload)`` holds (TensorBoard loads logs asynchronously)."""
        deadline = time.time() + timeout
        last = None
        while time.time() < deadline:
            status, body = self.get(path)
            if status == 200:
                last = json.loads(body)
                if predicate(last):
                    return last
            time.sleep(0.5)
        raise AssertionError(f"{path} did not satisfy the condition in {timeout} s; last: {str(last)[:500]}\n{self.output[-3000:]}")
