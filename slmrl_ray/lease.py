"""One driver per experiment: a lease in the experiment's storage.

`DriverLease` keeps a second driver off a running experiment: a lease file, created
exclusively, renewed while its holder lives, that another driver may take only once it
has expired or its holder is a dead process on the same host.

Leases are numbered generations (`driver.lease/000001`, `000002`, ...), the newest one
in force. Taking over a stale generation n means creating n+1 exclusively, so of several
drivers that find the same stale lease exactly one wins, and nothing is ever deleted on
the strength of an earlier read (deleting a stale lease and creating a new one are two
steps, and a second driver between them would delete the winner's fresh lease).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from typing import Callable

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
    """One driver per experiment: `<root>/driver.lease/<generation>`, renewed every `ttl_s / 3` s.

    A second driver finds the newest generation and refuses, unless it has expired (its
    holder stopped renewing: killed, or its machine gone) or its holder is a dead process on
    this host; then it creates the next generation exclusively, like anyone else who found it.
    """

    NAME = "driver.lease"

    def __init__(self, root: Storage, ttl_s: float = 60.0, what: str = "driver",
                 on_lost: Callable[["DriverLease"], None] | None = None) -> None:
        self.folder = root.child(self.NAME)
        self.root = root
        self.ttl_s = ttl_s
        # Called (from the renewal thread) when a renewal finds a newer generation: this holder
        # stalled past its expiry and another driver took over, so it must stop driving.
        self.on_lost = on_lost
        self.holder = {"id": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(), "what": what}
        self.place: Storage | None = None  # the generation this driver holds, once it does
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _payload(self) -> str:
        now = time.time()
        return json.dumps({**self.holder, "renewed_at": now, "expires_at": now + self.ttl_s}, indent=2)

    def generations(self) -> list[int]:
        """The lease generations in storage, oldest first."""
        return sorted(int(name) for name in self.folder.list() if name.isdigit())

    def _generation(self, number: int) -> Storage:
        return self.folder.child(f"{number:06d}")

    def acquire(self) -> "DriverLease":
        if self.folder.is_file():  # a single-file lease, from before generations
            legacy = self.folder.read_json()
            if not self._stale(legacy):
                raise self._held(legacy)
            self.folder.delete()
        for _ in range(3):
            found = self.generations()
            newest = found[-1] if found else 0
            if newest:
                try:
                    current = self._generation(newest).read_json()
                except (FileNotFoundError, OSError, ValueError):
                    continue  # released between the listing and the read
                if not self._stale(current):
                    raise self._held(current)
            mine = self._generation(newest + 1)
            if not mine.create_exclusive(self._payload()):
                continue  # another driver took this generation first: look again
            if self.generations()[-1] != newest + 1:  # a slow look: a newer generation is in force
                mine.delete()
                continue
            self.place = mine
            for older in found:  # superseded; a driver still looking at one finds ours newer
                self._generation(older).delete()
            self._thread = threading.Thread(target=self._renew, name="slmrl-ray-lease", daemon=True)
            self._thread.start()
            return self
        raise LeaseHeld(f"{self.root.uri}: another driver took the experiment over just now ({self.folder.uri})")

    def _held(self, current: dict) -> LeaseHeld:
        left = current.get("expires_at", 0) - time.time()
        return LeaseHeld(
            f"{self.root.uri} is being run by another {current.get('what', 'driver')} (pid "
            f"{current.get('pid')} on {current.get('host')}); two drivers would corrupt it. Wait for "
            f"it to finish or stop it; a driver that died frees the experiment {max(left, 0):.0f} s "
            f"after its last renewal ({self.folder.uri})"
        )

    def _stale(self, lease: dict) -> bool:
        if lease.get("expires_at", 0) < time.time():
            return True
        if lease.get("host") == socket.gethostname() and isinstance(lease.get("pid"), int):
            return not pid_alive(lease["pid"])
        return False

    def _renew(self) -> None:
        number = int(self.place.path.rsplit("/", 1)[-1])
        while not self._stop.wait(self.ttl_s / 3):
            try:
                if self.generations()[-1:] != [number]:  # superseded (or removed): never write it again
                    if self.on_lost is not None:
                        self.on_lost(self)
                    return
                self.place.write_text(self._payload())
            except (OSError, ValueError):
                continue  # storage hiccup: the next renewal tries again

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.place is None:
            return
        try:
            if self.place.read_json().get("id") == self.holder["id"]:
                self.place.delete()
        except (FileNotFoundError, OSError, ValueError):
            pass

    def __enter__(self) -> "DriverLease":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
