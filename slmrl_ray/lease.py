"""One driver per experiment: a lease file in the experiment's storage.

`DriverLease` keeps a second driver off a running experiment: a lease file, created
exclusively, renewed while its holder lives, that another driver may take only once it
has expired or its holder is a dead process on the same host.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid

from slmrl_ray.storage import Storage


def pid_alive(pid) -> bool:
    """Whether `pid` is a live process on this host (one we may not signal counts as alive)."""
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class LeaseHeld(RuntimeError):
    """Another live driver holds the experiment."""


class DriverLease:
    """One driver per experiment: `<root>/driver.lease`, renewed every `ttl_s / 3` s while held.

    A second driver finds the lease and refuses, unless it has expired (its holder stopped
    renewing: killed, or its machine gone) or its holder is a dead process on this host.
    Taking over deletes the stale lease and races for the exclusive create like anyone.
    """

    NAME = "driver.lease"

    def __init__(self, root: Storage, ttl_s: float = 60.0, what: str = "driver") -> None:
        self.place = root.child(self.NAME)
        self.root = root
        self.ttl_s = ttl_s
        self.holder = {"id": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(), "what": what}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _payload(self) -> str:
        now = time.time()
        return json.dumps({**self.holder, "renewed_at": now, "expires_at": now + self.ttl_s}, indent=2)

    def acquire(self) -> "DriverLease":
        for _ in range(2):
            if self.place.create_exclusive(self._payload()):
                self._thread = threading.Thread(target=self._renew, name="slmrl-ray-lease", daemon=True)
                self._thread.start()
                return self
            try:
                current = self.place.read_json()
            except (FileNotFoundError, OSError, ValueError):
                continue  # released (or being replaced) between the two calls
            if not self._stale(current):
                left = current.get("expires_at", 0) - time.time()
                raise LeaseHeld(
                    f"{self.root.uri} is being run by another {current.get('what', 'driver')} (pid "
                    f"{current.get('pid')} on {current.get('host')}); two drivers would corrupt it. Wait for "
                    f"it to finish or stop it; a driver that died frees the experiment {max(left, 0):.0f} s "
                    f"after its last renewal ({self.place.uri})"
                )
            self.place.delete()
        raise LeaseHeld(f"{self.root.uri}: another driver took the experiment over just now ({self.place.uri})")

    def _stale(self, lease: dict) -> bool:
        if lease.get("expires_at", 0) < time.time():
            return True
        if lease.get("host") == socket.gethostname() and isinstance(lease.get("pid"), int):
            return not pid_alive(lease["pid"])
        return False

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                if self.place.read_json().get("id") != self.holder["id"]:
                    return  # expired while we stalled, and taken over: never overwrite the new holder
                self.place.write_text(self._payload())
            except (OSError, ValueError):
                continue  # storage hiccup: the next renewal tries again

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            if self.place.read_json().get("id") == self.holder["id"]:
                self.place.delete()
        except (FileNotFoundError, OSError, ValueError):
            pass

    def __enter__(self) -> "DriverLease":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
