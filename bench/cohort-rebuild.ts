// Rebuild time of a wiped cohort replica: a real 3-member etcd (test harness),
// N records of B payload bytes written in txns of 128 puts, then a fresh
// CohortLedger with an empty replica is started and timed (paginated snapshot
// at one revision, then watch): first in memory (the engine alone), then into
// the daemon's SQLite replica file (what a wiped node does). Not part of the suite.
//
//   npx tsx bench/cohort-rebuild.ts [--records 100000] [--bytes 300] [--page 1000]
//
// Prints human lines and one JSON line ("result": ...).
import { randomBytes } from 'node:crypto';
import { loadavg } from 'node:os';
import { connectEtcd } from '../vault/cohort/etcd.js';
import { encodeEnvelope, newCommitId } from '../vault/cohort/envelope.js';
import { CohortLedger } from '../vault/cohort/ledger.js';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { MemoryReplica, type Replica } from '../vault/cohort/replica.js';
import { SqliteReplica } from '../vault/store/cohort-replica.js';
import { startEtcdCluster } from '../test/helpers/etcd.js';

const args = process.argv.slice(2);
const flag = (name: string, def: number) => {
  const i = args.indexOf(`--${name}`);
  return i >= 0 && args[i + 1] !== undefined ? Number(args[i + 1]) : def;
};
const records = flag('records', 100_000);
const bytes = flag('bytes', 300);
const page = flag('page', 1_000);

const cluster = await startEtcdCluster({ members: 3 });
const etcd = connectEtcd(cluster.endpoints, { attemptTimeoutMs: 10_000 });
try {
  const prefix = 'bench';
  const t0 = performance.now();
  let next = 0;
  const writer = async () => {
    for (;;) {
      const start = next;
      next += 128;
      if (start >= records) return;
      const puts = [];
      for (let k = start; k < Math.min(start + 128, records); k++) {
        const value = encodeEnvelope(newCommitId(), randomBytes(bytes));
        puts.push({ request_put: { key: Buffer.from(`${prefix}/r/${k.toString(16).padStart(8, '0')}`), value: Buffer.from(value) } });
      }
      await etcd.kv.txn({ compare: [], success: puts, failure: [] });
    }
  };
  await Promise.all(Array.from({ length: 8 }, writer));
  const loadMs = performance.now() - t0;
  console.log(`wrote ${records} records of ${bytes} B in ${(loadMs / 1000).toFixed(1)} s`);

  const status = await cluster.status(0);
  const rebuild = async (replica: Replica & { close?: () => void }) => {
    const ledger = new CohortLedger({ etcd, replica, prefix, nodeId: 'rebuild', snapshotPage: page, checkpointMs: 0 });
    const t1 = performance.now();
    await ledger.start();
    const ms = performance.now() - t1;
    const got = replica.keys(`${prefix}/r/`).length;
    await ledger.close();
    replica.close?.();
    if (got !== records) throw new Error(`rebuilt ${got} records, expected ${records}`);
    return ms;
  };
  const memoryMs = await rebuild(new MemoryReplica());
  const dir = mkdtempSync(join(tmpdir(), 'bkv-rebuild-'));
  let sqliteMs: number;
  try {
    sqliteMs = await rebuild(new SqliteReplica(join(dir, 'cohort.db')));
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
  const per100k = (ms: number) => (ms * 100_000) / records;
  console.log(`etcd db ${(status.dbSize / 1e6).toFixed(0)} MB; load average ${loadavg()[0]!.toFixed(1)}`);
  console.log(`rebuilt ${records} records in memory in ${(memoryMs / 1000).toFixed(2)} s (${(per100k(memoryMs) / 1000).toFixed(2)} s per 100 k)`);
  console.log(`rebuilt ${records} records into a SQLite replica in ${(sqliteMs / 1000).toFixed(2)} s (${(per100k(sqliteMs) / 1000).toFixed(2)} s per 100 k)`);
  console.log(
    JSON.stringify({
      result: 'cohort-rebuild',
      records,
      bytes,
      page,
      loadMs: Math.round(loadMs),
      memory: { rebuildMs: Math.round(memoryMs), per100kMs: Math.round(per100k(memoryMs)) },
      sqlite: { rebuildMs: Math.round(sqliteMs), per100kMs: Math.round(per100k(sqliteMs)) },
      dbBytes: status.dbSize,
      load1: loadavg()[0],
    }),
  );
} finally {
  etcd.close();
  await cluster.stop();
}
