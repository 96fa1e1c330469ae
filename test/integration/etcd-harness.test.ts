// The etcd groundwork against real etcd processes: the test harness
// (test/helpers/etcd.ts) and the vault's client factory (vault/cohort/etcd.ts).
// Writes come back within a bounded time after the leader is killed -9, a
// restarted member catches up, a wiped member rejoins under a new identity,
// and no etcd process outlives a cluster or the process that started it.
import { spawn } from 'node:child_process';
import { existsSync, readFileSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { Etcd3 } from 'etcd3';
import { commitOutcome, connectEtcd, failureKind, validateEndpoints } from '../../vault/cohort/etcd.js';
import { watchFrom } from '../../vault/cohort/watch.js';
import { startEtcdCluster, type EtcdCluster } from '../helpers/etcd.js';
import { ROOT } from '../helpers/daemon.js';

/** No such process, or only its zombie (dead, waiting for a parent that is not us to reap it). */
const gone = (pid: number) => {
  try {
    process.kill(pid, 0);
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === 'ESRCH';
  }
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    return stat.slice(stat.lastIndexOf(')') + 2).startsWith('Z');
  } catch {
    return true;
  }
};

/** A serializable read answered by member i alone: what that member has applied. */
async function readOn(cluster: EtcdCluster, i: number, key: string): Promise<string | null> {
  const one = connectEtcd([cluster.endpoints[i]!]);
  try {
    return await one.get(key).serializable(true).string();
  } finally {
    one.close();
  }
}

async function eventually<T>(f: () => Promise<T>, ok: (v: T) => boolean, ms = 5_000): Promise<T> {
  const deadline = Date.now() + ms;
  for (;;) {
    const v = await f().catch(() => undefined as T);
    if (ok(v) || Date.now() > deadline) return v;
    await new Promise((r) => setTimeout(r, 50));
  }
}

describe('endpoint validation', () => {
  it('names the bad entry and never echoes it', () => {
    expect(validateEndpoints(['http://127.0.0.1:2379', 'http://[::1]:2379/', 'http://etcd-2.internal:12379'])).toEqual([
      'http://127.0.0.1:2379',
      'http://[::1]:2379',
      'http://etcd-2.internal:12379',
    ]);
    const bad: [unknown, string][] = [
      [['http://127.0.0.1:2379', '127.0.0.1:2379'], 'config: cohort.etcd.endpoints[1] must be http(s)://host:port'],
      [['http://u:secret@127.0.0.1:2379'], 'config: cohort.etcd.endpoints[0] must be http(s)://host:port'],
      [['http://127.0.0.1'], 'config: cohort.etcd.endpoints[0] must be http(s)://host:port'],
      [['http://127.0.0.1:0'], 'config: cohort.etcd.endpoints[0] must be http(s)://host:port'],
      [['http://127.0.0.1:70000'], 'config: cohort.etcd.endpoints[0] must be http(s)://host:port'],
      [['grpc://127.0.0.1:2379'], 'config: cohort.etcd.endpoints[0] must be http(s)://host:port'],
      [['http://127.0.0.1:2379/v3'], 'config: cohort.etcd.endpoints[0] must be http(s)://host:port'],
      [['http://127.0.0.1:2379', 'http://127.0.0.1:2379/'], 'config: cohort.etcd.endpoints[1] repeats an earlier endpoint'],
      [['http://a:1', 'https://b:1'], 'config: cohort.etcd.endpoints must all use http:// or all https://, not a mix'],
      [[], 'config: cohort.etcd.endpoints must list at least one http(s)://host:port'],
      ['http://127.0.0.1:2379', 'config: cohort.etcd.endpoints must list at least one http(s)://host:port'],
    ];
    for (const [input, msg] of bad) {
      expect(() => validateEndpoints(input)).toThrow(msg);
      try {
        validateEndpoints(input);
      } catch (e) {
        expect((e as { code: string }).code).toBe('BAD_REQUEST');
        expect((e as Error).message).not.toContain('secret');
      }
    }
    expect(() => connectEtcd(['https://127.0.0.1:2379'])).toThrow('config: cohort.etcd.tls.ca is required with https:// endpoints');
    expect(() => connectEtcd(['http://127.0.0.1:2379'], { attemptTimeoutMs: 0 })).toThrow('config: cohort.etcd.attemptTimeoutMs must be a positive number of ms');
  });
});

describe('etcd harness and client', () => {
  let cluster: EtcdCluster;
  let etcd: Etcd3;
  beforeAll(async () => {
    cluster = await startEtcdCluster({ members: 3 });
    etcd = connectEtcd(cluster.endpoints);
  });
  afterAll(async () => {
    etcd?.close();
    await cluster?.stop();
  });

  it('starts three members on distinct loopback ports, logging to files', async () => {
    const urls = cluster.members.flatMap((m) => [m.clientUrl, m.peerUrl]);
    expect(new Set(urls).size).toBe(6);
    for (const u of urls) expect(u).toMatch(/^http:\/\/127\.0\.0\.1:\d+$/);
    const ids = await Promise.all([0, 1, 2].map((i) => cluster.status(i)));
    expect(new Set(ids.map((s) => s.clusterId)).size).toBe(1);
    expect(new Set(ids.map((s) => s.id)).size).toBe(3);
    expect(ids.map((s) => s.id)).toContain(ids[0]!.leader);
    for (const m of cluster.members) expect(existsSync(m.logFile)).toBe(true);
  });

  it('puts, gets, and commits a compare-and-swap on mod_revision', async () => {
    await etcd.put('rec/a').value('v1');
    expect(await etcd.get('rec/a').string()).toBe('v1');
    const got = await etcd.get('rec/a').exec();
    const rev = got.kvs[0]!.mod_revision;
    // The cluster id rides on every response header: a node pins it.
    expect(got.header.cluster_id).toBe((await cluster.status(0)).clusterId);

    const cas = (expectRev: string, value: string) =>
      etcd.kv.txn({
        compare: [{ key: Buffer.from('rec/a'), target: 'Mod', result: 'Equal', mod_revision: expectRev }],
        success: [{ request_put: { key: Buffer.from('rec/a'), value: Buffer.from(value) } }],
        failure: [{ request_range: { key: Buffer.from('rec/a') } }],
      });
    const ok = await commitOutcome(cas(rev, 'v2'));
    expect(ok.outcome).toBe('applied');
    const stale = await commitOutcome(cas(rev, 'v3'));
    expect(stale.outcome).toBe('compare-failed');
    // The failure branch read the record back in the same round trip.
    const now = stale.outcome === 'compare-failed' ? stale.response.responses[0]!.response_range!.kvs[0]! : undefined;
    expect(now?.value.toString()).toBe('v2');
    expect(Number(now?.mod_revision)).toBeGreaterThan(Number(rev));
    expect(await etcd.get('rec/a').string()).toBe('v2');
  });

  it('labels a refused connection not-applied and a member that stopped answering ambiguous', async () => {
    // A closed port: nothing was sent. The client retries it for its budget, then gives up.
    const nowhere = connectEtcd(['http://127.0.0.1:1'], { retryBudgetMs: 300 });
    const refused = await commitOutcome(nowhere.kv.txn({ compare: [], success: [], failure: [] }));
    nowhere.close();
    expect(refused.outcome).toBe('not-applied');

    // A member frozen mid-flight: the request may have reached it; only the per-attempt deadline ends the wait.
    const i = (await cluster.leader() + 1) % 3;
    const one = connectEtcd([cluster.endpoints[i]!], { attemptTimeoutMs: 500 });
    await one.put('rec/frozen').value('0');
    process.kill(cluster.members[i]!.pid, 'SIGSTOP');
    try {
      const t0 = Date.now();
      const r = await commitOutcome(
        one.kv.txn({ compare: [], success: [{ request_put: { key: Buffer.from('rec/frozen'), value: Buffer.from('1') } }], failure: [] }),
      );
      expect(r.outcome).toBe('ambiguous');
      expect(Date.now() - t0).toBeLessThan(3_000);
      expect(r.outcome === 'ambiguous' && failureKind(r.error)).toBe('ambiguous');
    } finally {
      process.kill(cluster.members[i]!.pid, 'SIGCONT');
      one.close();
    }
    await cluster.leader();
  });

  it('writes again within a bounded time after kill -9 of the leader, and the member catches up on restart', async () => {
    const lead = await cluster.leader();
    const pid = cluster.members[lead]!.pid;
    let seq = 0;
    const acked: number[] = [];
    const put = async () => {
      const n = ++seq;
      await etcd.put(`w/${String(n).padStart(6, '0')}`).value(String(n));
      acked.push(n);
    };
    for (let k = 0; k < 20; k++) await put();

    // Idempotent puts, retried on any failure: the stall is the kill to the first write that started after it and landed.
    const killedAt = Date.now();
    await cluster.kill(lead, 'SIGKILL');
    let stall = -1;
    while (Date.now() - killedAt < 15_000) {
      try {
        await put();
        stall = Date.now() - killedAt;
        break;
      } catch {
        // ambiguous or not applied: try again
      }
    }
    console.log(`etcd: write stall after kill -9 of the leader: ${stall} ms`);
    expect(stall).toBeGreaterThanOrEqual(0);
    expect(stall).toBeLessThan(8_000);
    expect(gone(pid)).toBe(true);
    const next = await cluster.leader();
    expect(next).not.toBe(lead);

    for (let k = 0; k < 20; k++) await put();
    const last = `w/${String(seq).padStart(6, '0')}`;
    await cluster.restart(lead);
    expect(cluster.members[lead]!.pid).not.toBe(pid);
    expect(await eventually(() => readOn(cluster, lead, last), (v) => v === String(seq))).toBe(String(seq));
    // Every acknowledged write is there.
    const all = await etcd.getAll().prefix('w/').strings();
    for (const n of acked) expect(all[`w/${String(n).padStart(6, '0')}`]).toBe(String(n));
  });

  it('wipes a member and re-adds it under a new member id through the cluster API', async () => {
    const lead = await cluster.leader();
    const j = (lead + 1) % 3;
    const before = await cluster.status(j);
    await cluster.wipe(j);
    expect(existsSync(cluster.members[j]!.dataDir)).toBe(false);
    // Through the leader alone: the shared client may still hold a call on the wiped
    // member's connection, and a write that dies with it is rightly ambiguous, not retried.
    const live = connectEtcd([cluster.endpoints[lead]!]);
    await live.put('rec/after-wipe').value('yes');
    await cluster.rejoin(j);
    const after = await cluster.status(j);
    expect(after.id).not.toBe(before.id);
    expect(after.clusterId).toBe(before.clusterId);
    expect(await eventually(() => readOn(cluster, j, 'rec/after-wipe'), (v) => v === 'yes')).toBe('yes');
    const members = await live.cluster.memberList({});
    live.close();
    expect(members.members.map((m) => m.name).sort()).toEqual(['n1', 'n2', 'n3']);
    expect(members.members.map((m) => m.ID)).not.toContain(before.id);
  });

  it('watchFrom replays with prev_kv in revision order and resumes a broken stream without a gap', async () => {
    const r0 = BigInt((await etcd.get('ws/').exec()).header.revision);
    const total = 3_000;
    for (let i = 0; i < total; i += 50) {
      await Promise.all(Array.from({ length: 50 }, (_, k) => etcd.put(`ws/${(i + k) % 500}`).value(String(i + k)).exec()));
    }
    // One txn: three events, one revision, in the txn's order.
    await etcd.kv.txn({ compare: [], success: ['x', 'y', 'z'].map((c) => ({ request_put: { key: Buffer.from(`ws/t-${c}`), value: Buffer.from(c) } })), failure: [] });
    const j = (await cluster.leader() + 1) % 3;
    const one = connectEtcd([cluster.endpoints[j]!]);
    const seen: { rev: bigint; key: string; prev: boolean }[] = [];
    let restarted: Promise<void> | undefined;
    const sub = watchFrom(one, 'ws/', r0 + 1n, {
      onEvents(evs) {
        for (const ev of evs) seen.push({ rev: BigInt(ev.kv.mod_revision), key: ev.kv.key.toString(), prev: !!ev.prev_kv });
        // Break the only stream this client has, in the middle of the replay.
        restarted ??= cluster.restart(j);
      },
      onCanceled: (e) => {
        throw e;
      },
    });
    const deadline = Date.now() + 20_000;
    while (seen.length < total + 3 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50));
    await restarted;
    await sub.close();
    one.close();
    expect(seen.length).toBe(total + 3);
    expect(new Set(seen.map((e) => `${e.rev}/${e.key}`)).size).toBe(total + 3);
    for (let k = 1; k < seen.length; k++) expect(seen[k]!.rev >= seen[k - 1]!.rev).toBe(true);
    expect(seen.filter((e) => e.prev).length).toBe(total - 500); // every overwrite carries the value it replaced
    expect(seen.slice(-3).map((e) => [e.key, e.rev === seen[seen.length - 1]!.rev])).toEqual([
      ['ws/t-x', true],
      ['ws/t-y', true],
      ['ws/t-z', true],
    ]);
    expect(sub.next()).toBe(seen[seen.length - 1]!.rev + 1n);
  });

  it('watchFrom reports a compacted start as canceled, and the client keeps serving its other watches', async () => {
    const head = BigInt((await etcd.put('wc/a').value('1').exec()).header.revision);
    await etcd.kv.compact({ revision: String(head), physical: true });
    const own = connectEtcd(cluster.endpoints);
    const other = watchFrom(own, 'wc/', head + 1n, { onEvents: () => undefined, onCanceled: () => undefined });
    const canceled = await new Promise<Error>((resolve) => watchFrom(own, 'wc/', 2n, { onEvents: () => undefined, onCanceled: resolve }));
    expect(canceled.message).toMatch(/^Watcher canceled/);
    // The other watch on the same stream still gets events, and closes.
    const got = new Promise<string>((resolve) => {
      other.watcher.on('put', (kv) => resolve(kv.value.toString()));
    });
    await etcd.put('wc/a').value('2');
    expect(await got).toBe('2');
    await other.close();
    own.close();
  });

  it('stop() leaves no etcd process and no folder', async () => {
    const pids = cluster.members.map((m) => m.pid);
    etcd.close();
    await cluster.stop();
    for (const pid of pids) expect(gone(pid)).toBe(true);
    expect(existsSync(cluster.dir)).toBe(false);
  });
});

describe('a process that dies abnormally', () => {
  it('takes its etcd members with it', async () => {
    // A child starts a cluster, prints the PIDs, then exits with a failure
    // code without calling stop(): the harness's exit hook must kill them.
    const helper = join(ROOT, 'test/helpers/etcd.ts');
    const script = `
      const { startEtcdCluster } = await import(${JSON.stringify(helper)});
      const c = await startEtcdCluster({ members: 1 });
      console.log(JSON.stringify({ pids: c.members.map((m) => m.pid), dir: c.dir }));
      process.exit(3);
    `;
    const child = spawn(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', script], { cwd: ROOT, stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    let err = '';
    child.stdout.on('data', (d: Buffer) => (out += d));
    child.stderr.on('data', (d: Buffer) => (err += d));
    const code = await new Promise<number | null>((r) => child.once('exit', r));
    expect(code, err).toBe(3);
    const { pids, dir } = JSON.parse(out.trim().split('\n').pop()!) as { pids: number[]; dir: string };
    expect(pids.length).toBe(1);
    try {
      const alive = await eventually(async () => pids.filter((p) => !gone(p)), (a) => a.length === 0, 5_000);
      expect(alive).toEqual([]);
      expect(existsSync(dir)).toBe(false);
    } finally {
      for (const p of pids) if (!gone(p)) process.kill(p, 'SIGKILL'); // only when the hook failed
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
