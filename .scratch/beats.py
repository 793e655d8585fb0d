"""Instructions per in-memory heartbeat (Coordinator.heartbeat + its share of the sweep's liveness units),
for the module in sys.argv[1]: R rounds of every miner's heartbeat then a sweep; run twice under valgrind."""
import asyncio, os, sys, tempfile
sys.path.insert(0, sys.argv[1])
import aitbc_coord as ac

MINERS, BUSY, ROUNDS = 2000, int(sys.argv[3]), int(sys.argv[2])

class Clock:
    t = 1_764_000_000.0
    def __call__(self): return self.t

async def main():
    d = tempfile.mkdtemp()
    clock = Clock()
    s = ac.Settings.load({"APP_ENV": "dev"}, db_path=os.path.join(d, "c.db"), sweep_interval_seconds=0)
    ac.migrate(s.db_path)
    c = ac.Coordinator(s, clock, monotonic=clock)
    await c.start()
    for i in range(MINERS):
        await c.apply(ac.tx_register, f"m{i}", {}, 1, None, c.now(), 3)
    for i in range(BUSY):
        await c.apply(ac.tx_submit, "c", "{}", '{}', ac.shape_of({}), 10**9, c.now(), None, 0)
        await c.apply(ac.tx_poll, f"m{i}", c.now(), c.matcher)
    for i in range(MINERS):
        await c.heartbeat(f"m{i}", 1 if i < BUSY else 0, "ONLINE", None)
    await c.sweep()
    for _ in range(ROUNDS):
        clock.t += 15
        for i in range(MINERS):
            await c.heartbeat(f"m{i}", 1 if i < BUSY else 0, "ONLINE", None)
        await c.sweep()
    await c.stop()

asyncio.run(main())
