"""Both daemons as processes with a fault-injecting TCP proxy between them.

The proxy (tests/replication/chaos_proxy.py) drops connections, stalls, truncates and
flips bits at random while qemu-io writes through the primary's NBD export and
checkpoints are taken; then the faults stop, and the DR site must restore every checkpoint
and latest bit for bit as the primary does.
"""

from __future__ import annotations

import asyncio
import random
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.replication.chaos_proxy import ChaosProxy, FaultPlan

from .harness import Daemon, cdp, need_qemu_tools, short_tmp, wait_for
from .test_replication_e2e import (
    Receiver,
    caught_up,
    free_port,
    qemu_io,
    replica_of,
    restores_match,
    sites,
)

pytestmark = pytest.mark.integration


@contextmanager
def proxy_thread(port: int, plan: FaultPlan, seed: int) -> Iterator[ChaosProxy]:
    """Run the proxy on an event loop of its own, in a thread, for a synchronous test."""
    loop = asyncio.new_event_loop()
    proxy = ChaosProxy("127.0.0.1", port, plan, seed=seed)
    ready = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(proxy.start())
        ready.set()
        loop.run_forever()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    ready.wait(10)
    try:
        yield proxy
    finally:
        asyncio.run_coroutine_threadsafe(proxy.close(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        t.join(30)
        loop.close()


@pytest.mark.parametrize("seed", [1])
def test_faulty_link_between_the_daemons(tmp_path: Path, seed: int) -> None:
    need_qemu_tools()
    rng = random.Random(seed)
    plan = FaultPlan(drop=0.3, stall=0.03, truncate=0.02, flip=0.02, stall_s=(0.05, 0.5))
    rport = free_port()
    with short_tmp() as sock, proxy_thread(rport, plan, seed) as proxy:
        primary, dr = sites(tmp_path, sock, rport)
        text = primary.read_text().replace(f":{rport}", f":{proxy.port}")
        primary.write_text(text)
        rcv = Receiver(dr, tmp_path / "dr.log").start()
        d = Daemon(primary, tmp_path / "p.log").start()
        names = []
        try:
            wait_for(lambda: d.volume("disk0")["onboarding"]["state"] == "done", "onboarding")
            kinds = ("drop", "stall", "truncate")
            for k in range(60):  # bounded; stops once every kind of fault was injected
                fresh = tmp_path / f"r{k % 2}.bin"  # new random data: nothing to deduplicate
                fresh.write_bytes(rng.randbytes(1 << 20))
                cmds = [
                    f"write -s {fresh} {rng.randrange(0, 31) << 20} 1M",
                    f"write -P {rng.randrange(1, 255)} {rng.randrange(0, 31) << 20} 64k",
                ]
                if k % 4 == 3:
                    cmds.append(f"write -z {rng.randrange(0, 31) << 20} 256k")
                qemu_io(sock, *cmds)
                if k % 3 == 2:
                    name = f"cp{k}"
                    cdp(primary, "checkpoint", "disk0", "--name", name)
                    names.append(name)
                seen = proxy.faults
                if all(seen[x] for x in kinds) and seen["flip_up"] + seen["flip_down"] and k > 8:
                    break
            wait_for(lambda: replica_of(d)["acked_seq"] > 0, "some shipping under faults")
            proxy.faults_enabled = False
            wait_for(lambda: caught_up(d), "the replica to catch up once the link heals")
            for n in names:
                restores_match(tmp_path, primary, dr, f"checkpoint:{n}")
            restores_match(tmp_path, primary, dr, "latest")
            assert cdp(primary, "verify", "disk0", "--replica", "dr1").code == 0
            f = proxy.faults
            assert all(f[x] for x in kinds) and f["flip_up"] + f["flip_down"], proxy.summary()
            assert replica_of(d)["reconnects"] > 0
            assert d.proc is not None and d.proc.poll() is None, "the primary must not crash"
            assert rcv.proc is not None and rcv.proc.poll() is None, "nor the receiver"
        finally:
            d.stop()
            rcv.stop()
