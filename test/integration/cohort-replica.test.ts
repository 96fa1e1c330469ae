// The SQLite replica (vault/store/cohort-replica.ts) under the real engine on a
// real 3-member etcd: the cohort-wide attempt limit holds with SQLite replicas,
// the replicas converge to one chain head and state, a reopened file holds
// exactly what was applied (revision, head, cluster id, values), and a wiped
// file rebuilds from etcd to the same state.
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { Etcd3 } from 'etcd3';
import { connectEtcd } from '../../vault/cohort/etcd.js';
import { CohortLedger } from '../../vault/cohort/ledger.js';
import { snapshotHead } from '../../vault/cohort/replica.js';
import { SqliteReplica } from '../../vault/store/cohort-replica.js';
import { startEtcdCluster, type EtcdCluster } from '../helpers/etcd.js';

const u32 = (n: number) => {
  const b = new Uint8Array(4);
  new DataView(b.buffer).setUint32(0, n);
  return b;
};
const num = (b: Uint8Array | undefined) => (b ? new DataView(b.buffer, b.byteOffset, 4).getUint32(0) : undefined);

interface Node {
  etcd: Etcd3;
  replica: SqliteReplica;
  ledger: CohortLedger;
  close(): Promise<void>;
}
const open = new Set<Node>();

async function startNode(endpoints: string[], file: string, nodeId: string): Promise<Node> {
  const etcd = connectEtcd(endpoints);
  const replica = new SqliteReplica(file);
  const ledger = new CohortLedger({ checkpointMs: 0, etcd, replica, prefix: 't-sql', nodeId });
  const node: Node = {
    etcd,
    replica,
    ledger,
    async close() {
      open.delete(node);
      await ledger.close();
      etcd.close();
      replica.close();
    },
  };
  open.add(node);
  await ledger.start();
  return node;
}

/** State digest over every value with its mod_revision (not the history). */
function digest(r: SqliteReplica): string {
  const m = new Map(r.keys('').map((k) => [k, r.get(k)!] as const));
  return Buffer.from(snapshotHead(0n, m)).toString('hex');
}

describe('SQLite replica under the cohort engine on a 3-member etcd', () => {
  let cluster: EtcdCluster;
  let dir: string;
  beforeAll(async () => {
    dir = mkdtempSync(join(tmpdir(), 'bkv-replica-'));
    cluster = await startEtcdCluster({ members: 3 });
  });
  afterAll(async () => {
    for (const n of [...open]) await n.close();
    await cluster?.stop();
    rmSync(dir, { recursive: true, force: true });
  });

  it('holds the cohort-wide limit, converges, survives a reopen, and rebuilds when wiped', async () => {
    const files = [0, 1, 2].map((i) => join(dir, `n${i}.db`));
    const nodes: Node[] = [];
    for (let i = 0; i < 3; i++) nodes.push(await startNode(cluster.endpoints, files[i]!, `n${i}`));
    const id = 'aa01';
    await nodes[0]!.ledger.commit(id, () => u32(100));
    const results = await Promise.all(
      Array.from({ length: 150 }, (_, k) =>
        nodes[k % 3]!.ledger.commit(id, (cur) => {
          const n = num(cur)!;
          return n === 0 ? undefined : u32(n - 1);
        }),
      ),
    );
    expect(results.filter((r) => r.changed).length).toBe(100);
    await Promise.all(Array.from({ length: 40 }, (_, k) => nodes[k % 3]!.ledger.commit(`b${k.toString(16).padStart(4, '0')}`, () => u32(k))));
    await nodes[1]!.ledger.commit('b0003', () => null); // a tombstone stays a value
    const at = await nodes[0]!.ledger.readIndex();
    await Promise.all(nodes.map((n) => n.ledger.waitApplied(at)));
    expect(new Set(nodes.map((n) => n.replica.appliedRevision)).size).toBe(1);
    expect(new Set(nodes.map((n) => Buffer.from(n.replica.chainHead).toString('hex'))).size).toBe(1);
    expect(new Set(nodes.map((n) => digest(n.replica))).size).toBe(1);
    expect(num((await nodes[2]!.ledger.read(id)).value)).toBe(0);

    // Reopen node 2's file: exactly what it applied, head and cluster id included.
    const before = {
      rev: nodes[2]!.replica.appliedRevision,
      head: Buffer.from(nodes[2]!.replica.chainHead).toString('hex'),
      cluster: nodes[2]!.replica.clusterId,
      digest: digest(nodes[2]!.replica),
      size: nodes[2]!.replica.size,
    };
    await nodes[2]!.close();
    const reopened = new SqliteReplica(files[2]!);
    expect({
      rev: reopened.appliedRevision,
      head: Buffer.from(reopened.chainHead).toString('hex'),
      cluster: reopened.clusterId,
      digest: digest(reopened),
      size: reopened.size,
    }).toEqual(before);
    expect(before.size).toBeGreaterThanOrEqual(41);
    reopened.close();
    // It catches up from its own revision after writes it missed.
    await nodes[0]!.ledger.commit(id, () => u32(7));
    const n2 = await startNode(cluster.endpoints, files[2]!, 'n2');
    expect(num((await n2.ledger.read(id)).value)).toBe(7);

    // Wipe node 1's file: it rebuilds from a snapshot to the same state.
    await nodes[1]!.close();
    for (const s of ['', '-wal', '-shm']) rmSync(files[1]! + s, { force: true });
    const n1 = await startNode(cluster.endpoints, files[1]!, 'n1');
    const at2 = await nodes[0]!.ledger.readIndex();
    await Promise.all([nodes[0]!, n1, n2].map((n) => n.ledger.waitApplied(at2)));
    expect(digest(n1.replica)).toBe(digest(nodes[0]!.replica));
    expect(digest(n2.replica)).toBe(digest(nodes[0]!.replica));
    expect(num((await n1.ledger.read(id)).value)).toBe(7);
  }, 60_000);
});
