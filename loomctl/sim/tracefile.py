"""A simulated run's trace, in the format of a real one (loom-trace(5)), so that
``loomctl trace summary / timeline / export`` read it unchanged.

Times are simulated seconds since the submission (a real trace has Unix times; readers
only subtract them). The server file has the workers, the job, every scheduler round
(``dur``: the server time charged for it) and the assignments; each worker file has its
tasks (cpu slots as a real worker numbers them) and the data it fetched.

Invariants: every file starts with a header and ends with an ``end`` record; records are
written in batches of at most BATCH tasks, so memory stays bounded on long runs.
"""

from __future__ import annotations

import os

import msgpack

from loomctl import protocol as P
from loomctl.trace import format as F

BATCH = 4096


class SimTrace:
    def __init__(self, directory: str, workers: list, addresses: list[str], names: list[str]):
        os.makedirs(directory, exist_ok=True)
        self.directory = directory
        self.pack = msgpack.Packer(use_bin_type=True).pack
        self.addresses = addresses
        self.server = open(os.path.join(directory, F.SERVER_FILE), "wb")
        self.server.write(self.pack(self._header("server")))
        self.files = []
        self.pending: list[list] = []
        for w, address, name in zip(workers, addresses, names):
            self.server.write(self.pack({"k": F.WORKER, "t": 0.0, "worker": w.wid, "name": name,
                                         "address": address, "cpus": w.cpus, "host": "simulated"}))
            f = open(os.path.join(directory, F.worker_file(name)), "wb")
            f.write(self.pack(self._header("worker", name=name, worker=w.wid, address=address, cpus=w.cpus,
                                           resources={})))
            self.files.append(f)
            self.pending.append([])

    @staticmethod
    def _header(role: str, **fields) -> dict:
        return {"k": F.HEADER, "format": F.FORMAT, "version": F.VERSION, "role": role, "t": 0.0,
                "host": "simulated", "pid": 0, **fields}

    def job(self, t: float, job) -> None:
        self.server.write(self.pack({"k": F.JOB, "t": t, "job": job.id, "name": job.name, "base": job.base,
                                     "n": job.n}))

    def job_end(self, t: float, job) -> None:
        self.server.write(self.pack({"k": F.JOB_END, "t": t, "job": job.id, "status": job.status,
                                     "finished": job.finished, "failed": job.failed}))

    def round(self, t: float, dur: float, placed: int, ready: int) -> None:
        self.server.write(self.pack({"k": F.ROUND, "t": t, "dur": dur, "placed": placed, "ready": ready}))

    def assign(self, t: float, wid: int, ids) -> None:
        self.server.write(self.pack({"k": F.ASSIGN, "t": t, "worker": wid, "ids": P.ids_to_bytes(ids)}))

    def task(self, index: int, wid: int, job: int, row, t0: float, t1: float, slots: tuple, size: int) -> None:
        pending = self.pending[index]
        pending.append((row.id, job, slots, row.cpus, row.symbol, row.label, t0, t1, size, list(row.inputs)))
        if len(pending) >= BATCH:
            self._tasks(index, wid)

    def _tasks(self, index: int, wid: int) -> None:
        pending = self.pending[index]
        if not pending:
            return
        self.pending[index] = []
        ids, jobs, slots, cpus, syms, labels, t0, t1, size, inputs = zip(*pending)
        record = {"k": F.TASKS, "w": wid, "id": ids, "job": jobs, "slot": [s[0] for s in slots], "cpus": cpus,
                  "sym": syms, "label": labels, "t0": t0, "t1": t1, "status": ["ok"] * len(ids), "size": size,
                  "in": inputs}
        if any(len(s) > 1 for s in slots):
            record["slots"] = [list(s) if len(s) > 1 else None for s in slots]
        self.files[index].write(self.pack(record))

    def xfer(self, index: int, src: int, t0: float, t1: float, nbytes: int, ids) -> None:
        self.files[index].write(self.pack({"k": F.XFER, "t0": t0, "t1": t1, "from": self.addresses[src],
                                           "to": self.addresses[index], "bytes": int(nbytes), "n": len(ids),
                                           "ids": P.ids_to_bytes(ids)}))

    def close(self, t: float, wids: list[int]) -> None:
        for index, (f, wid) in enumerate(zip(self.files, wids)):
            self._tasks(index, wid)
            f.write(self.pack({"k": F.END, "t": t}))
            f.close()
        self.server.write(self.pack({"k": F.END, "t": t}))
        self.server.close()
