// The cohort replication engine (vault/cohort/ledger.ts) against real 3-member
// etcd clusters, with several engines ("nodes") in this process, each with its
// own etcd client and MemoryReplica: the attempt limit holds under concurrent
// commits from every node, group commit batches, replicas converge, a wiped or
// compacted-away replica rebuilds, an unknown txn outcome is looked up rather
// than decided twice, writers continue after kill -9 of the etcd leader, and a
// rewound or replaced etcd is refused with STATE_ROLLBACK_DETECTED.
import { cpSync, rmSync } from 'node:fs';
import { createServer, connect, type Server, type Socket } from 'node:net';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { Etcd3 } from 'etcd3';
import { connectEtcd, type EtcdClientOptions } from '../../vault/cohort/etcd.js';
import { CohortLedger, type CohortLedgerOptions, type CommitResult } from '../../vault/cohort/ledger.js';
import { MemoryReplica, chainStep, ZERO_HEAD } from '../../vault/cohort/replica.js';
import { decodeEnvelope, encodeEnvelope, newCommitId } from '../../vault/cohort/envelope.js';
import { startEtcdCluster, type EtcdCluster } from '../helpers/etcd.js';

const u32 = (n: number) => {
  const b = new Uint8Array(4);
  new DataView(b.buffer).setUint32(0, n);
  return b;
};
const num = (b: Uint8Array | undefined) => (b ? new DataView(b.buffer, b.byteOffset, 4).getUint32(0) : undefined);
const increment = (cur: Uint8Array | undefined) => u32((num(cur) ?? 0) + 1);
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const maxRev = (rs: CommitResult[]) => rs.reduce((m, r) => (r.revision > m ? r.revision : m), 0n);

interface Node {
  etcd: Etcd3;
  replica: MemoryReplica;
  ledger: CohortLedger;
  close(): Promise<void>;
}
const open = new Set<Node>();

async function startNode(
  endpoints: string[],
  prefix: string,
  nodeId: string,
  o: Partial<CohortLedgerOptions> & { client?: EtcdClientOptions } = {},
): Promise<Node> {
  const etcd = connectEtcd(endpoints, o.client);
  const replica = (o.replica as MemoryReplica | undefined) ?? new MemoryReplica();
  const ledger = new CohortLedger({ checkpointMs: 0, ...o, etcd, replica, prefix, nodeId });
  const node: Node = {
    etcd,
    replica,
    ledger,
    async close() {
      open.delete(node);
      await ledger.close();
      etcd.close();
    },
  };
  open.add(node);
  try {
    await ledger.start();
  } catch (e) {
    await node.close();
    throw e;
  }
  return node;
}

/** All nodes at one revision, so their heads and states compare. */
async function converge(nodes: Node[]): Promise<bigint> {
  const r = await nodes[0]!.ledger.readIndex();
  await Promise.all(nodes.map((n) => n.ledger.waitApplied(r)));
  return r;
}

/**
 * A TCP proxy in front of one etcd member that can hold back everything
 * etcd sends (and deliver it later, in order): a txn goes through and
 * commits, but its answer arrives only after the client gave up on it.
 */
async function holdingProxy(
  target: string,
): Promise<{ url: string; hold(): void; holdRequests(): void; release(): void; close(): Promise<void> }> {
  const t = new URL(target);
  let holding = false;
  let holdingUp = false;
  const held: (() => void)[] = [];
  const socks = new Set<Socket>();
  const server: Server = createServer((c) => {
    const up = connect(Number(t.port), t.hostname);
    socks.add(c).add(up);
    c.on('data', (d) => (holdingUp ? held.push(() => up.write(d)) : up.write(d)));
    up.on('data', (d) => (holding ? held.push(() => c.write(d)) : c.write(d)));
    const end = () => {
      c.destroy();
      up.destroy();
    };
    c.on('error', end).on('close', end);
    up.on('error', end).on('close', end);
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  const port = (server.address() as import('node:net').AddressInfo).port;
  return {
    url: `http://127.0.0.1:${port}`,
    hold: () => (holding = true),
    holdRequests: () => (holdingUp = true),
    release() {
      holding = false;
      holdingUp = false;
      for (const f of held.splice(0)) f();
    },
    async close() {
      for (const s of socks) s.destroy();
      await new Promise((r) => server.close(r));
    },
  };
}

describe('envelope and chain', () => {
  it('round-trips values and tombstones, and refuses foreign values', () => {
    const id = newCommitId();
    expect(decodeEnvelope(encodeEnvelope(id, u32(7)))).toEqual({ commitId: id, payload: u32(7) });
    expect(decodeEnvelope(encodeEnvelope(id, undefined))).toEqual({ commitId: id, payload: undefined });
    expect(decodeEnvelope(Buffer.from('plain'))).toBeUndefined();
    const tomb = encodeEnvelope(id, undefined);
    expect(decodeEnvelope(Uint8Array.from([...tomb, 1]))).toBeUndefined(); // a tombstone carries nothing
  });

  it('chains each revision over its exact changes', () => {
    const a = chainStep(ZERO_HEAD, 5n, [{ type: 'put', key: 'k', value: u32(1) }]);
    expect(chainStep(ZERO_HEAD, 5n, [{ type: 'put', key: 'k', value: u32(1) }])).toEqual(a);
    expect(chainStep(ZERO_HEAD, 6n, [{ type: 'put', key: 'k', value: u32(1) }])).not.toEqual(a);
    expect(chainStep(ZERO_HEAD, 5n, [{ type: 'put', key: 'k', value: u32(2) }])).not.toEqual(a);
    expect(chainStep(ZERO_HEAD, 5n, [{ type: 'delete', key: 'k' }])).not.toEqual(a);
    expect(chainStep(a, 6n, [])).not.toEqual(chainStep(ZERO_HEAD, 6n, []));
  });
});

describe('cohort ledger on a 3-member etcd', () => {
  let cluster: EtcdCluster;
  beforeAll(async () => {
    cluster = await startEtcdCluster({ members: 3 });
  });
  afterAll(async () => {
    for (const n of [...open]) await n.close();
    await cluster?.stop();
  });

  it('refuses bad record ids and configuration with BAD_REQUEST', async () => {
    const etcd = connectEtcd(cluster.endpoints);
    try {
      expect(() => new CohortLedger({ etcd, replica: new MemoryReplica(), prefix: 'bkv/', nodeId: 'a' })).toThrow(/prefix/);
      expect(() => new CohortLedger({ etcd, replica: new MemoryReplica(), prefix: 'bkv', nodeId: 'A B' })).toThrow(/nodeId/);
      const l = new CohortLedger({ etcd, replica: new MemoryReplica(), prefix: 't-bad', nodeId: 'a' });
      await expect(l.commit('XYZ', () => u32(1))).rejects.toMatchObject({ code: 'BAD_REQUEST' });
      await expect(l.commit('ab/../cd', () => u32(1))).rejects.toMatchObject({ code: 'BAD_REQUEST' });
      await l.close();
    } finally {
      etcd.close();
    }
  });

  it('300 concurrent attempts over 3 nodes against a limit of 200: exactly 200 pass, and the replicas converge to one chain head', async () => {
    const nodes: Node[] = [];
    for (let i = 0; i < 3; i++) nodes.push(await startNode(cluster.endpoints, 't-limit', `n${i}`));
    // Started with no write in between: one origin, so one chain.
    expect(new Set(nodes.map((n) => n.replica.appliedRevision)).size).toBe(1);
    const id = 'aa01';
    await nodes[0]!.ledger.commit(id, () => u32(200));
    const results = await Promise.all(
      Array.from({ length: 300 }, (_, k) =>
        nodes[k % 3]!.ledger.commit(id, (cur) => {
          const n = num(cur)!;
          return n === 0 ? undefined : u32(n - 1); // the attempt counter: no check once spent
        }),
      ),
    );
    const passed = results.filter((r) => r.changed);
    expect(passed.length).toBe(200);
    // Each passing attempt took its own step: 199 down to 0, each once.
    expect(new Set(passed.map((r) => num(r.value))).size).toBe(200);
    expect(results.filter((r) => !r.changed).every((r) => num(r.value) === 0)).toBe(true);
    await Promise.all(nodes.map((n) => n.ledger.waitApplied(maxRev(results))));
    for (const n of nodes) expect(num((await n.ledger.read(id)).value)).toBe(0);

    const at = await converge(nodes);
    expect(nodes.every((n) => n.replica.appliedRevision >= at)).toBe(true);
    expect(new Set(nodes.map((n) => n.replica.appliedRevision)).size).toBe(1);
    expect(new Set(nodes.map((n) => n.ledger.status().chainHead)).size).toBe(1);
    expect(new Set(nodes.map((n) => n.replica.stateDigest())).size).toBe(1);
    const s = nodes.map((n) => n.ledger.stats);
    const txns = s.reduce((a, x) => a + x.txns, 0);
    const conflicts = s.reduce((a, x) => a + x.compareFailed, 0);
    console.log(`cohort: 300 attempts on one key over 3 nodes: ${txns} txns, ${conflicts} lost compares`);
    expect(txns).toBeLessThan(300); // group commit: fewer txns than commits even under contention
    for (const n of nodes) await n.close();
  });

  it('group-commits one node\'s concurrent writers into few txns, chaining writes on one key in order', async () => {
    const n = await startNode(cluster.endpoints, 't-group', 'g0');
    const before = n.ledger.stats.txns;
    const distinct = Promise.all(Array.from({ length: 200 }, (_, k) => n.ledger.commit(`b${k.toString(16).padStart(4, '0')}`, () => u32(k))));
    const chained = Promise.all(Array.from({ length: 100 }, () => n.ledger.commit('cc', increment)));
    // A decide that throws fails its own commit only; the chain goes on past it.
    const boom = n.ledger
      .commit('cc', () => {
        throw new Error('decide refused');
      })
      .then(() => undefined, (e: unknown) => e);
    const [d, c] = await Promise.all([distinct, chained]);
    expect(await boom).toEqual(new Error('decide refused'));
    const txns = n.ledger.stats.txns - before;
    console.log(`cohort: 301 commits from one node in ${txns} txns (largest batch ${n.ledger.stats.largestBatch})`);
    expect(txns).toBeLessThanOrEqual(12); // 201 keys at <= 64 keys per txn, plus the first alone
    expect(c.map((r) => num(r.value)).sort((a, b) => a! - b!)).toEqual(Array.from({ length: 100 }, (_, k) => k + 1));
    await n.ledger.waitApplied(maxRev([...d, ...c]));
    expect(num((await n.ledger.read('cc')).value)).toBe(100);
    expect(num((await n.ledger.read('b00c7')).value)).toBe(199);

    // A delete leaves a tombstone that decide() can tell from "never written".
    const seen: { cur: number | undefined; deleted: boolean }[] = [];
    const look = (cur: Uint8Array | undefined, info: { deleted: boolean }) => {
      seen.push({ cur: num(cur), deleted: info.deleted });
      return undefined;
    };
    await Promise.all([n.ledger.commit('ee', look), n.ledger.commit('ee', () => u32(1)), n.ledger.commit('ee', look), n.ledger.commit('ee', () => null), n.ledger.commit('ee', look)]);
    await n.ledger.commit('ee', look);
    expect(seen).toEqual([
      { cur: undefined, deleted: false },
      { cur: 1, deleted: false },
      { cur: undefined, deleted: true },
      { cur: undefined, deleted: true },
    ]);
    expect((await n.ledger.read('ee')).value).toBeUndefined();

    await n.close();
  });

  it('figures: commits/s serial vs group-committed, one hot key and distinct keys, one node and three', async () => {
    const nodes: Node[] = [];
    for (let i = 0; i < 3; i++) nodes.push(await startNode(cluster.endpoints, 't-fig', `f${i}`));
    const run = async (label: string, onNodes: number, workers: number, key: (node: number, w: number) => string) => {
      const before = nodes.map((n) => ({ ...n.ledger.stats }));
      let done = 0;
      const ms = 1_000;
      const end = performance.now() + ms;
      await Promise.all(
        nodes.slice(0, onNodes).flatMap((n, i) =>
          Array.from({ length: workers }, async (_, w) => {
            while (performance.now() < end) {
              await n.ledger.commit(key(i, w), increment);
              done++;
            }
          }),
        ),
      );
      const txns = nodes.reduce((a, n, i) => a + n.ledger.stats.txns - before[i]!.txns, 0);
      const lost = nodes.reduce((a, n, i) => a + n.ledger.stats.compareFailed - before[i]!.compareFailed, 0);
      const rate = done / (ms / 1000);
      console.log(`cohort figures: ${label}: ${rate.toFixed(0)} commits/s in ${txns} txns (${lost} lost compares)`);
      return rate;
    };
    const serial = await run('1 node x 1 writer, one key', 1, 1, () => 'aa');
    const grouped = await run('1 node x 32 writers, one key', 1, 32, () => 'aa');
    const contended = await run('3 nodes x 32 writers, one key', 3, 32, () => 'aa');
    const spread = await run('3 nodes x 32 writers, own keys', 3, 32, (i, w) => `b${i}${w.toString(16).padStart(2, '0')}`);
    expect(grouped).toBeGreaterThan(serial * 3);
    expect(contended).toBeGreaterThan(serial);
    expect(spread).toBeGreaterThan(serial);
    const total = num((await nodes[0]!.ledger.read('aa')).value);
    expect(total).toBeGreaterThan(0);
    for (const n of nodes) await n.close();
  });

  it('rebuilds a wiped replica from a paginated snapshot, and re-snapshots a replica whose watch start was compacted away', async () => {
    const a = await startNode(cluster.endpoints, 't-rebuild', 'a');
    let b = await startNode(cluster.endpoints, 't-rebuild', 'b');
    const rs = await Promise.all(Array.from({ length: 500 }, (_, k) => a.ledger.commit(`e${k.toString(16).padStart(4, '0')}`, () => u32(k))));
    await b.ledger.waitApplied(maxRev(rs));
    await b.close();

    // Wiped: a fresh replica loads a snapshot in pages, then follows the watch.
    b = await startNode(cluster.endpoints, 't-rebuild', 'b', { snapshotPage: 64 });
    expect(b.ledger.stats.snapshots).toBe(1);
    await converge([a, b]);
    expect(b.replica.stateDigest()).toBe(a.replica.stateDigest());
    expect(b.replica.entries().size).toBe(500);
    const more = await a.ledger.commit('e0001', increment);
    await b.ledger.waitApplied(more.revision);
    expect(num((await b.ledger.read('e0001')).value)).toBe(2);

    // Down while history it needs is compacted away: the start finds the
    // watch cancelled, snapshots again (auditing its old values) and catches up.
    const kept = b.replica;
    await b.close();
    const later = await Promise.all(Array.from({ length: 50 }, (_, k) => a.ledger.commit(`f${k.toString(16).padStart(4, '0')}`, () => u32(k))));
    await a.etcd.kv.compact({ revision: String(maxRev(later)), physical: true });
    b = await startNode(cluster.endpoints, 't-rebuild', 'b', { replica: kept });
    expect(b.ledger.stats.snapshots).toBe(1);
    await converge([a, b]);
    expect(b.replica.stateDigest()).toBe(a.replica.stateDigest());
    expect(b.ledger.stopped).toBeUndefined();
    await a.close();
    await b.close();
  });

  it('serves a read only after applying etcd\'s current revision, and stops on a replica that disagrees with etcd\'s history', async () => {
    const a = await startNode(cluster.endpoints, 't-cont', 'a');
    const b = await startNode(cluster.endpoints, 't-cont', 'b');
    for (let k = 1; k <= 20; k++) {
      await a.ledger.commit('c1', () => u32(k));
      // No wait in between: b's read waits for the revision etcd is at.
      expect(num((await b.ledger.read('c1')).value)).toBe(k);
    }
    // b's copy of c1 altered at the same mod_revision (an old database file
    // put back under a newer anchor): the next change of c1 carries etcd's
    // previous version, which b never applied.
    const key = b.ledger.recordKey('c1');
    const entries = b.replica.entries();
    const e = entries.get(key)!;
    entries.set(key, { modRevision: e.modRevision, value: encodeEnvelope(newCommitId(), u32(0)) });
    b.replica.reset(b.replica.appliedRevision, entries, b.replica.chainHead, b.replica.clusterId!);
    await a.ledger.commit('c1', increment);
    await expect(b.ledger.read('c1')).rejects.toMatchObject({ code: 'STATE_ROLLBACK_DETECTED' });
    expect(b.ledger.stopped?.message).toMatch(/never applied/);
    await expect(b.ledger.commit('c2', increment)).rejects.toMatchObject({ code: 'STATE_ROLLBACK_DETECTED' });
    expect(a.ledger.stopped).toBeUndefined();
    await a.close();
    await b.close();
  });

  it('catches an old copy of its replica up from etcd, and refuses one whose history is not the anchored one', async () => {
    const clone = (r: MemoryReplica, head = r.chainHead) => {
      const c = new MemoryReplica();
      c.reset(r.appliedRevision, r.entries(), head, r.clusterId!);
      return c;
    };
    const n = await startNode(cluster.endpoints, 't-old', 'o1');
    for (let k = 0; k < 5; k++) await n.ledger.waitApplied((await n.ledger.commit('a1', increment)).revision);
    const old = clone(n.replica);
    for (let k = 0; k < 5; k++) await n.ledger.waitApplied((await n.ledger.commit('a1', increment)).revision);
    // What the HSM would hold: the highest applied revision and the head there.
    const anchor = { revision: n.replica.appliedRevision, head: n.replica.chainHead };
    await n.close();

    const caught = await startNode(cluster.endpoints, 't-old', 'o1', { replica: clone(old), anchor });
    expect(num((await caught.ledger.read('a1')).value)).toBe(10);
    expect(caught.ledger.status().chainHead).toBe(Buffer.from(anchor.head).toString('hex'));
    await caught.close();

    // A copy with another history behind it (its head differs) reaches the anchored revision with another head.
    const forged = clone(old, new Uint8Array(32).fill(7));
    await expect(startNode(cluster.endpoints, 't-old', 'o1', { replica: forged, anchor })).rejects.toMatchObject({
      code: 'STATE_ROLLBACK_DETECTED',
      message: expect.stringMatching(/chain head/),
    });
    // One at the anchored revision already is checked before anything else.
    const atAnchor = clone(old, new Uint8Array(32).fill(7));
    atAnchor.reset(anchor.revision, old.entries(), new Uint8Array(32).fill(7), old.clusterId!);
    await expect(startNode(cluster.endpoints, 't-old', 'o1', { replica: atAnchor, anchor })).rejects.toMatchObject({ code: 'STATE_ROLLBACK_DETECTED' });
  });

  it('a txn that committed but whose answer was lost is found by its commit id, and decide() runs once', async () => {
    const proxy = await holdingProxy(cluster.endpoints[0]!);
    const n = await startNode([proxy.url], 't-doubt', 'p0', { client: { attemptTimeoutMs: 400 } });
    try {
      await n.ledger.commit('d1', () => u32(10));
      let calls = 0;
      proxy.hold();
      const p = n.ledger.commit('d1', (cur) => {
        calls++;
        return u32(num(cur)! - 1);
      });
      await sleep(1_200);
      proxy.release();
      const r = await p;
      expect(n.ledger.stats.ambiguous).toBeGreaterThanOrEqual(1);
      expect(n.ledger.stats.landedInDoubt).toBe(1);
      expect(calls).toBe(1);
      expect(r.changed).toBe(true);
      expect(num(r.value)).toBe(9);
      // etcd holds one decrement, not two.
      const direct = connectEtcd(cluster.endpoints);
      const raw = (await direct.get(n.ledger.recordKey('d1')).exec()).kvs[0]!;
      direct.close();
      expect(num(decodeEnvelope(raw.value)!.payload)).toBe(9);
      expect(BigInt(raw.mod_revision)).toBe(r.revision);
    } finally {
      await n.close();
      await proxy.close();
    }
  });

  it('a txn held up on its way to etcd, then delivered after the client gave up, counts once whichever way it went', async () => {
    const proxy = await holdingProxy(cluster.endpoints[1]!);
    const n = await startNode([proxy.url], 't-doubt2', 'q0', { client: { attemptTimeoutMs: 400 } });
    try {
      await n.ledger.commit('d2', () => u32(10));
      let calls = 0;
      proxy.holdRequests();
      const p = n.ledger.commit('d2', (cur) => {
        calls++;
        return u32(num(cur)! - 1);
      });
      await sleep(1_200);
      proxy.release(); // the txn reaches etcd late; it may apply, or be cancelled
      const r = await p;
      expect(n.ledger.stats.ambiguous).toBeGreaterThanOrEqual(1);
      expect(num(r.value)).toBe(9);
      expect(calls).toBeLessThanOrEqual(2);
      await n.ledger.waitApplied(r.revision);
      const direct = connectEtcd(cluster.endpoints);
      const raw = (await direct.get(n.ledger.recordKey('d2')).exec()).kvs[0]!;
      direct.close();
      expect(num(decodeEnvelope(raw.value)!.payload)).toBe(9);
      console.log(`cohort: late txn: decide ran ${calls}x, landed-in-doubt ${n.ledger.stats.landedInDoubt}`);
    } finally {
      await n.close();
      await proxy.close();
    }
  });

  it('stops (INTERNAL) rather than skip a revision the replica failed to apply', async () => {
    class Flaky extends MemoryReplica {
      fail = false;
      override apply(...a: Parameters<MemoryReplica['apply']>): void {
        if (this.fail) throw new Error('disk full');
        super.apply(...a);
      }
    }
    const replica = new Flaky();
    const n = await startNode(cluster.endpoints, 't-flaky', 'f0', { replica });
    await n.ledger.waitApplied((await n.ledger.commit('a1', () => u32(1))).revision);
    replica.fail = true;
    const r = await n.ledger.commit('a1', increment); // committed by the quorum; the local apply fails
    await expect(n.ledger.waitApplied(r.revision)).rejects.toMatchObject({ code: 'INTERNAL' });
    expect(n.ledger.stopped?.message).toMatch(/could not apply/);
    await expect(n.ledger.commit('a1', increment)).rejects.toMatchObject({ code: 'INTERNAL' });
    await n.close();
  });

  it('writers on 3 nodes continue after kill -9 of the etcd leader, and no acknowledged commit is lost', async () => {
    const nodes: Node[] = [];
    for (let i = 0; i < 3; i++) nodes.push(await startNode(cluster.endpoints, 't-kill', `k${i}`, { checkpointMs: 300 }));
    let stop = false;
    let acked = 0;
    const unknown: unknown[] = [];
    const failed: unknown[] = [];
    const perNode = [0, 0, 0];
    let lastAck = Date.now();
    let longestGap = 0;
    const worker = async (i: number, w: number) => {
      for (let k = 0; !stop; k++) {
        try {
          await nodes[i]!.ledger.commit('ff00', increment);
          await nodes[i]!.ledger.commit(`ff${i}${w.toString(16).padStart(2, '0')}`, increment);
          acked++;
          perNode[i]!++;
          const now = Date.now();
          longestGap = Math.max(longestGap, now - lastAck);
          lastAck = now;
        } catch (e) {
          if ((e as { code?: string }).code === 'INTERNAL') unknown.push(e);
          else failed.push(e);
        }
      }
    };
    const workers = nodes.flatMap((_, i) => Array.from({ length: 8 }, (_, w) => worker(i, w)));
    await sleep(800);
    const lead = await cluster.leader();
    await cluster.kill(lead, 'SIGKILL');
    const killedAt = Date.now();
    const ackedAtKill = acked;
    while (acked === ackedAtKill && Date.now() - killedAt < 10_000) await sleep(20);
    const stall = Date.now() - killedAt;
    await sleep(1_000);
    stop = true;
    await Promise.all(workers);
    console.log(`cohort: kill -9 of the etcd leader: first commit after ${stall} ms; longest gap between acks ${longestGap} ms; ${acked} acked, ${unknown.length} unknown, ${failed.length} failed`);
    expect(stall).toBeLessThan(5_000);
    expect(acked).toBeGreaterThan(ackedAtKill);
    expect(perNode.every((c) => c > 0)).toBe(true);
    expect(failed).toEqual([]);
    // Every acknowledged increment is there; an unknown one may or may not be.
    const r = await nodes[0]!.ledger.read('ff00');
    expect(num(r.value)!).toBeGreaterThanOrEqual(acked);
    expect(num(r.value)!).toBeLessThanOrEqual(acked + unknown.length);
    await converge(nodes);
    expect(new Set(nodes.map((n) => n.replica.stateDigest())).size).toBe(1);
    expect(new Set(nodes.map((n) => n.ledger.status().chainHead)).size).toBe(1);
    for (const n of nodes) expect(n.ledger.stopped).toBeUndefined();
    for (const n of nodes) await n.close();
    await cluster.restart(lead);
  });
});

describe('rollback detection', () => {
  it('refuses an etcd restored from an older copy (running node, and a node that was down while the copy was advanced past its revision)', async () => {
    const c = await startEtcdCluster({ members: 3 });
    const backup = `${c.dir}/backup`;
    const all = [0, 1, 2];
    try {
      const x = await startNode(c.endpoints, 't-rb', 'x');
      const y = await startNode(c.endpoints, 't-rb', 'y');
      await Promise.all(['01', '02', '03'].map((id) => x.ledger.commit(id, () => u32(1))));
      await x.ledger.checkpoint(true);

      // The copy: every member stopped cleanly, data dirs copied, started again.
      for (const i of all) await c.kill(i, 'SIGTERM');
      for (const i of all) cpSync(c.members[i]!.dataDir, `${backup}/n${i}`, { recursive: true });
      await Promise.all(all.map((i) => c.restart(i)));

      // History after the copy: attempts counted, a checkpoint written.
      const rs = await Promise.all(['01', '02', '03', '04'].map((id) => x.ledger.commit(id, increment)));
      await x.ledger.checkpoint(true);
      const applied = await converge([x, y]);
      expect(applied).toBeGreaterThanOrEqual(maxRev(rs));
      const yReplica = y.replica;
      await y.close();
      // What x's HSM would anchor; a wiped x given it starts on the genuine cluster.
      const xAnchor = { revision: x.replica.appliedRevision, checkpoint: x.ledger.status().checkpoint! };
      expect(xAnchor.checkpoint.modRevision).toBeGreaterThan(maxRev(rs));
      await (await startNode(c.endpoints, 't-rb', 'x', { anchor: xAnchor })).close();

      // Restore the copy: the attempts above are gone from etcd.
      for (const i of all) await c.kill(i, 'SIGTERM');
      for (const i of all) {
        rmSync(c.members[i]!.dataDir, { recursive: true, force: true });
        cpSync(`${backup}/n${i}`, c.members[i]!.dataDir, { recursive: true });
      }
      await Promise.all(all.map((i) => c.restart(i)));

      // The running node refuses to go on: its next commit, and everything after.
      await expect(x.ledger.commit('01', increment)).rejects.toMatchObject({ code: 'STATE_ROLLBACK_DETECTED' });
      expect(x.ledger.stopped?.code).toBe('STATE_ROLLBACK_DETECTED');
      await expect(x.ledger.read('02')).rejects.toMatchObject({ code: 'STATE_ROLLBACK_DETECTED' });
      await x.close();
      // x wiped: its anchor alone refuses etcd below the anchored revision.
      await expect(startNode(c.endpoints, 't-rb', 'x', { anchor: { revision: xAnchor.revision } })).rejects.toMatchObject({
        code: 'STATE_ROLLBACK_DETECTED',
        message: expect.stringMatching(/anchored revision/),
      });

      // Advance the restored history past what y applied, then start y on its replica.
      const raw = connectEtcd(c.endpoints);
      const base = BigInt((await raw.get('t-rb/.').exec()).header.revision);
      for (let k = 0; base + BigInt(k) <= applied + 5n; k++) await raw.put(`t-rb/r/ee${k.toString(16).padStart(2, '0')}`).value(Buffer.from(encodeEnvelope(newCommitId(), u32(k))));
      expect(BigInt((await raw.get('t-rb/.').exec()).header.revision)).toBeGreaterThan(applied);
      raw.close();
      await expect(startNode(c.endpoints, 't-rb', 'y', { replica: yReplica })).rejects.toMatchObject({ code: 'STATE_ROLLBACK_DETECTED' });
      // x wiped, past its anchored revision now: its own last checkpoint is missing from etcd.
      await expect(startNode(c.endpoints, 't-rb', 'x', { anchor: xAnchor })).rejects.toMatchObject({
        code: 'STATE_ROLLBACK_DETECTED',
        message: expect.stringMatching(/last checkpoint/),
      });

      // What the engine cannot do: a node with no history and no anchor has nothing to compare.
      const fresh = await startNode(c.endpoints, 't-rb', 'z');
      expect(num((await fresh.ledger.read('01')).value)).toBe(1);
      await fresh.close();
    } finally {
      for (const n of [...open]) await n.close();
      await c.stop();
    }
  });

  it('refuses a different etcd cluster, even one whose revision is past the replica\'s', async () => {
    const a = await startEtcdCluster({ members: 1 });
    const b = await startEtcdCluster({ members: 1 });
    try {
      const n = await startNode(a.endpoints, 't-other', 'o');
      await n.ledger.commit('01', () => u32(1));
      await n.ledger.waitApplied((await n.ledger.commit('02', () => u32(2))).revision);
      const kept = n.replica;
      await n.close();
      const raw = connectEtcd(b.endpoints);
      for (let k = 0; k < Number(kept.appliedRevision) + 5; k++) await raw.put(`t-other/x${k}`).value('v');
      raw.close();
      await expect(startNode(b.endpoints, 't-other', 'o', { replica: kept })).rejects.toMatchObject({ code: 'STATE_ROLLBACK_DETECTED' });
      // Back on its own cluster it starts.
      const again = await startNode(a.endpoints, 't-other', 'o', { replica: kept });
      expect(num((await again.ledger.read('02')).value)).toBe(2);
      await again.close();
    } finally {
      for (const n of [...open]) await n.close();
      await a.stop();
      await b.stop();
    }
  });
});
