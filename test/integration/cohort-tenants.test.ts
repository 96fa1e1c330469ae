// The cohort tenant directory (vault/cohort/tenants.ts) against a real 3-member
// etcd, engine-level like test/integration/cohort-ledger.test.ts: several "nodes" in this
// process, each an engine with its own etcd client and MemoryReplica seen
// through its own CohortTenants. A tenant added on one node is active on the
// others; a revocation made on one reaches every node's listener (what closes
// open connections in the daemon); the one-time import of local tables copies
// exactly one node's table when nodes race; a tenant value copied under
// another tenant's id is refused; a rebuilt replica has every tenant.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { Etcd3 } from 'etcd3';
import { connectEtcd } from '../../vault/cohort/etcd.js';
import { CohortLedger } from '../../vault/cohort/ledger.js';
import { MemoryReplica, ObservedReplica } from '../../vault/cohort/replica.js';
import { CohortTenants, cohortTenantId, TENANT_IMPORT_ID } from '../../vault/cohort/tenants.js';
import type { Tenant } from '../../vault/store/tenants.js';
import { ErrorCodes, VaultError } from '../../protocol/errors.js';
import { startEtcdCluster, type EtcdCluster } from '../helpers/etcd.js';

interface Node {
  etcd: Etcd3;
  replica: MemoryReplica;
  ledger: CohortLedger;
  tenants: CohortTenants;
  /** Every (name, versions) the revocation listener got, with when. */
  revoked: { name: string; versions: number[]; at: number }[];
  close(): Promise<void>;
}
const open = new Set<Node>();

async function startNode(endpoints: string[], prefix: string, nodeId: string): Promise<Node> {
  const etcd = connectEtcd(endpoints);
  const replica = new MemoryReplica();
  const tenants = new CohortTenants(prefix);
  const observed = new ObservedReplica(replica);
  tenants.follow(observed);
  const ledger = new CohortLedger({ checkpointMs: 0, etcd, replica: observed, prefix, nodeId });
  const revoked: Node['revoked'] = [];
  tenants.onRevoked((name, versions) => revoked.push({ name, versions, at: Date.now() }));
  const node: Node = {
    etcd,
    replica,
    ledger,
    tenants,
    revoked,
    async close() {
      open.delete(node);
      await ledger.close();
      etcd.close();
    },
  };
  open.add(node);
  await ledger.start();
  tenants.attach(ledger);
  return node;
}

/** All nodes at one revision. */
async function converge(nodes: Node[]): Promise<void> {
  const r = await nodes[0]!.ledger.readIndex();
  await Promise.all(nodes.map((n) => n.ledger.waitApplied(r)));
}

const row = (name: string, version: number, state: 'active' | 'revoked' = 'active', namespace = name): Tenant => ({
  name,
  version,
  state,
  createdAt: 1_700_000_000_000 + version,
  revokedAt: state === 'revoked' ? 1_700_000_100_000 : null,
  namespace,
});

async function until(cond: () => boolean, ms: number): Promise<void> {
  const deadline = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error(`not within ${ms} ms`);
    await new Promise((r) => setTimeout(r, 5));
  }
}

describe('cohort tenant directory on a real 3-member etcd', () => {
  let cluster: EtcdCluster;

  beforeAll(async () => {
    cluster = await startEtcdCluster({ members: 3 });
  }, 60_000);
  afterAll(async () => {
    for (const n of [...open]) await n.close();
    await cluster?.stop();
  });

  it('a tenant added on one node is active on every node; a revocation on another reaches every node within a second', async () => {
    const [a, b, c] = await Promise.all(['a', 'b', 'c'].map((id) => startNode(cluster.endpoints, 't-ten', id)));
    expect(await a!.tenants.add('acme', 1000)).toBe(1);
    // add() resolves once applied on the node that ran it: readable there at once.
    expect(a!.tenants.isActive('acme', 1)).toBe(true);
    await converge([a!, b!, c!]);
    for (const n of [b!, c!]) {
      expect(n.tenants.isActive('acme', 1)).toBe(true);
      expect(n.tenants.home('acme')).toBe('acme');
    }
    // Concurrent new versions on two nodes: distinct versions, none lost.
    const vs = await Promise.all([b!.tenants.add('acme', 2000), c!.tenants.add('acme', 3000)]);
    expect(vs.sort()).toEqual([2, 3]);
    await converge([a!, b!, c!]);
    expect(a!.tenants.list()).toEqual(b!.tenants.list());
    expect(c!.tenants.list().map((t) => [t.name, t.version, t.state])).toEqual([
      ['acme', 1, 'active'],
      ['acme', 2, 'active'],
      ['acme', 3, 'active'],
    ]);

    // One version, then the rest, revoked on node b: every node's listener hears it.
    expect(await b!.tenants.revoke('acme', 4000, 2)).toBe(1);
    const t0 = Date.now();
    expect(await b!.tenants.revoke('acme', 5000)).toBe(2);
    await until(() => [a!, c!].every((n) => n.revoked.some((r) => r.versions.includes(3))), 1_000);
    for (const n of [a!, b!, c!]) {
      expect(n.revoked.map((r) => [r.name, r.versions])).toEqual([
        ['acme', [2]],
        ['acme', [1, 3]],
      ]);
      expect([1, 2, 3].some((v) => n.tenants.isActive('acme', v))).toBe(false);
    }
    console.log(`cohort tenants: revocation heard on the other nodes ${Math.max(...[a!, c!].map((n) => n.revoked.at(-1)!.at)) - t0} ms after the revoking node's call`);
    // Nothing left to revoke: 0, and no listener call.
    expect(await a!.tenants.revoke('acme', 6000)).toBe(0);
    expect(await a!.tenants.revoke('nobody', 6000)).toBe(0);
    expect(a!.revoked).toHaveLength(2);
    // A revoked tenant's new version is active again, in the same namespace.
    expect(await c!.tenants.add('acme', 7000)).toBe(4);
    await converge([a!, b!, c!]);
    expect(a!.tenants.isActive('acme', 4)).toBe(true);
    await expect(a!.tenants.add('Bad Name', 1)).rejects.toMatchObject({ code: ErrorCodes.BAD_REQUEST });
    for (const n of [a!, b!, c!]) await n.close();
  }, 60_000);

  it('import of local tables: nodes racing copy one table once; a node whose table differs is told; a rebuilt replica has every tenant', async () => {
    const prefix = 't-imp';
    const nodes = await Promise.all(['a', 'b', 'c'].map((id) => startNode(cluster.endpoints, prefix, id)));
    const [a, b, c] = nodes as [Node, Node, Node];
    const tableA = [row('alpha', 1, 'revoked'), row('alpha', 2), row('beta', 1, 'active', '_legacy')];
    const tableB = [row('gamma', 1)];
    const res = await Promise.all([a.tenants.migrate(tableA, 'a'), b.tenants.migrate(tableB, 'b'), c.tenants.migrate([], 'c')]);
    await converge(nodes);
    const marker = (await a.ledger.read(TENANT_IMPORT_ID)).value;
    const from = JSON.parse(Buffer.from(marker!).toString()) as { node: string };
    const winner = from.node === 'a' ? tableA : tableB;
    expect(['a', 'b']).toContain(from.node);
    for (const n of nodes) {
      expect(n.tenants.list()).toEqual(winner);
    }
    // Each tenant written once, by whichever node got to it; the loser's table differs and is told so.
    expect(res.reduce((s, r) => s + r.written, 0)).toBe(from.node === 'a' ? 2 : 1);
    expect(res[from.node === 'a' ? 1 : 0]!.differ.length).toBeGreaterThan(0);
    expect(res[from.node === 'a' ? 0 : 1]!.differ).toEqual([]);
    expect(res[2]!.differ).toEqual([]);
    if (from.node === 'a') expect(a.tenants.home('beta')).toBe('_legacy');
    // Once is once: a second start imports nothing, whatever its table.
    expect(await c.tenants.migrate([row('delta', 1)], 'c')).toMatchObject({ written: 0, differ: expect.arrayContaining(['delta']) });
    await converge(nodes);
    expect(c.tenants.isActive('delta', 1)).toBe(false);

    // A fresh replica (wiped node) loads every tenant from the snapshot.
    const d = await startNode(cluster.endpoints, prefix, 'd');
    expect(d.tenants.list()).toEqual(winner);
    for (const n of [...nodes, d]) await n.close();
  }, 60_000);

  it('a first cohort start whose etcd already has tenants imports nothing', async () => {
    const a = await startNode(cluster.endpoints, 't-imp2', 'a');
    await a.tenants.add('made-online', 1);
    const r = await a.tenants.migrate([row('old', 1)], 'a');
    expect(r).toEqual({ written: 0, differ: ['made-online', 'old'] });
    expect(a.tenants.list().map((t) => t.name)).toEqual(['made-online']);
    await a.close();
  }, 30_000);

  it("a tenant value copied under another tenant's id is refused: no tenant there, and changes to it fail RECORD_CORRUPT", async () => {
    const prefix = 't-copy';
    const a = await startNode(cluster.endpoints, prefix, 'a');
    await a.tenants.add('good', 1);
    const key = (name: string) => a.ledger.recordKey(cohortTenantId(name));
    const raw = (await a.etcd.get(key('good')).buffer())!;
    // Someone with etcd access copies good's value under evil's id.
    const put = await a.etcd.put(key('evil')).value(raw).exec();
    await a.ledger.waitApplied(BigInt(put.header.revision));
    expect(a.tenants.isActive('evil', 1)).toBe(false);
    expect(a.tenants.isActive('good', 1)).toBe(true);
    expect(a.tenants.list().map((t) => t.name)).toEqual(['good']);
    const e = await a.tenants.add('evil', 2).catch((x: unknown) => x as VaultError);
    expect(e).toBeInstanceOf(VaultError);
    expect((e as VaultError).code).toBe(ErrorCodes.RECORD_CORRUPT);
    // The engine went on: other tenants still change.
    expect(await a.tenants.add('good', 3)).toBe(2);
    expect(a.ledger.stopped).toBeUndefined();
    await a.close();
  }, 30_000);
});
