// Measurements behind /work/wt/memos/etcd.md: real etcd clusters started by the
// test harness on loopback, driven through the vault's client (connectEtcd).
// Not part of the suite: timings depend on the machine and its load.
//
//   npx tsx bench/etcd-probe.ts stall [--kills 5] [--client tuned|default] [--attempt 1000] [--heartbeat 100 --election 1000]
//   npx tsx bench/etcd-probe.ts churn [--seconds 30] [--heartbeat 50 --election 500]
//   npx tsx bench/etcd-probe.ts txn [--seconds 5] [--runs 3]
//   npx tsx bench/etcd-probe.ts watch [--changes 10000]
//   npx tsx bench/etcd-probe.ts snapshot [--keys 100000]     (also the db size per key)
//   npx tsx bench/etcd-probe.ts ids
//
// Each prints human lines and one JSON line per result ("result": ...).
import { randomBytes } from 'node:crypto';
import { readFileSync, readdirSync, statSync } from 'node:fs';
import { loadavg } from 'node:os';
import { join } from 'node:path';
import { Etcd3, type IRangeRequest, type ITxnRequest } from 'etcd3';
import { connectEtcd, failureKind } from '../vault/cohort/etcd.js';
import { watchFrom } from '../vault/cohort/watch.js';
import { startEtcdCluster, type EtcdCluster, type StartEtcdOptions } from '../test/helpers/etcd.js';

const args = process.argv.slice(2);
const cmd = args[0] ?? 'help';
const flag = (name: string, def: string) => {
  const i = args.indexOf(`--${name}`);
  return i >= 0 && args[i + 1] !== undefined ? args[i + 1]! : def;
};
const num = (name: string, def: number) => Number(flag(name, String(def)));
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const median = (xs: number[]) => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length === 0 ? NaN : s.length % 2 ? s[(s.length - 1) / 2]! : (s[s.length / 2 - 1]! + s[s.length / 2]!) / 2;
};
/** The share of the last minute in which some runnable task waited for a CPU (Linux PSI), in %. */
const cpuPressure = () => {
  try {
    return Number(/avg60=([\d.]+)/.exec(readFileSync('/proc/pressure/cpu', 'utf8'))?.[1]);
  } catch {
    return NaN;
  }
};
const result = (name: string, data: object) =>
  console.log(JSON.stringify({ result: name, load1: +loadavg()[0]!.toFixed(2), cpuPressure60: cpuPressure(), ...data }));
const b = (s: string) => Buffer.from(s);
const value300 = (tag: string) => Buffer.concat([b(tag.padEnd(32, ' ')), randomBytes(134)]).toString('hex').slice(0, 300);

/** etcd's production raft timings unless asked otherwise (the test harness defaults to 50/500). */
function clusterOpts(): StartEtcdOptions {
  return { members: 3, heartbeatMs: num('heartbeat', 100), electionMs: num('election', 1000) };
}

// ---------------------------------------------------------------------------
// Write stall after kill -9 of the leader.

async function stall(): Promise<void> {
  const kills = num('kills', 5);
  const which = flag('client', 'tuned');
  const cluster = await startEtcdCluster(clusterOpts());
  const attemptTimeoutMs = num('attempt', 1_000);
  const client = which === 'default' ? new Etcd3({ hosts: cluster.endpoints }) : connectEtcd(cluster.endpoints, { attemptTimeoutMs });
  let seq = 0;
  const acked: number[] = [];
  const done: { started: number; ended: number }[] = [];
  const errors = new Map<string, number>();
  let running = true;
  // One writer, one idempotent put at a time, retrying whatever fails.
  const writer = (async () => {
    while (running) {
      const n = ++seq;
      const started = Date.now();
      try {
        await client.put(`w/${String(n).padStart(7, '0')}`).value(String(n));
        acked.push(n);
        done.push({ started, ended: Date.now() });
      } catch (e) {
        const k = `${failureKind(e)}: ${(e as Error).message.replace(/\d+\.\d+\.\d+\.\d+:\d+/g, 'HOST').replace(/ after [\d.]+s,.*$/, '').slice(0, 90)}`;
        errors.set(k, (errors.get(k) ?? 0) + 1);
      }
    }
  })();
  const stalls: number[] = [];
  const elections: number[] = [];
  try {
    for (let k = 0; k < kills; k++) {
      await sleep(1_500);
      const lead = await cluster.leader();
      const killedAt = Date.now();
      await cluster.kill(lead, 'SIGKILL');
      const newLeader = cluster.leader(20_000).then(() => Date.now() - killedAt);
      let s = -1;
      while (Date.now() - killedAt < 30_000) {
        const first = done.find((d) => d.started >= killedAt);
        if (first) {
          s = first.ended - killedAt;
          break;
        }
        await sleep(10);
      }
      const e = await newLeader;
      stalls.push(s);
      elections.push(e);
      console.log(`kill ${k + 1}: leader n${lead + 1} killed; new leader agreed after ${e} ms; first write after the kill landed after ${s} ms`);
      await cluster.restart(lead);
    }
  } finally {
    running = false;
    await writer;
  }
  const all = await connectEtcd(cluster.endpoints).getAll().prefix('w/').keys();
  const have = new Set(all);
  const lost = acked.filter((n) => !have.has(`w/${String(n).padStart(7, '0')}`)).length;
  console.log(`client ${which}${which === 'tuned' ? ` (attempt deadline ${attemptTimeoutMs} ms)` : ''}: stall median ${median(stalls)} ms (min ${Math.min(...stalls)}, max ${Math.max(...stalls)}) over ${kills} kills; election median ${median(elections)} ms; ${acked.length} acknowledged writes, ${lost} lost`);
  for (const [k, v] of errors) console.log(`  ${v} x ${k}`);
  result('stall', { client: which, attemptTimeoutMs, opts: clusterOpts(), stalls, elections, medianStall: median(stalls), medianElection: median(elections), acked: acked.length, lost, errors: Object.fromEntries(errors) });
  client.close();
  await cluster.stop();
}

// ---------------------------------------------------------------------------
// Spurious elections: raft term changes while the cluster is busy but nobody is killed.

async function churn(): Promise<void> {
  const seconds = num('seconds', 30);
  const cluster = await startEtcdCluster(clusterOpts());
  try {
    const term = async () => Math.max(...(await Promise.all([0, 1, 2].map((i) => cluster.status(i)))).map((s) => Number(s.raftTerm)));
    const before = await term();
    const load = await groupCommitRun(cluster, 32, 3, 10_000, false, seconds);
    const after = await term();
    console.log(`raft timings ${JSON.stringify(clusterOpts())}: ${after - before} term changes in ${seconds} s of group commits (${load.committedPutsPerSec} puts/s)`);
    result('churn', { opts: clusterOpts(), seconds, termChanges: after - before, load });
  } finally {
    await cluster.stop();
  }
}

// ---------------------------------------------------------------------------
// Group commit: N CAS puts in one txn, each compared on its key's mod_revision;
// the failure branch reads every key back, so a loser learns in the same round
// trip which compares failed and what is there now.

export function groupCommitTxn(batch: { key: string; expectModRev: string; value: Buffer | string }[]): ITxnRequest {
  return {
    compare: batch.map((x) => ({ key: b(x.key), target: 'Mod' as const, result: 'Equal' as const, mod_revision: x.expectModRev })),
    success: batch.map((x) => ({ request_put: { key: b(x.key), value: Buffer.isBuffer(x.value) ? x.value : b(x.value) } })),
    failure: batch.map((x) => ({ request_range: { key: b(x.key) } })),
  };
}

async function groupCommitRun(cluster: EtcdCluster, n: number, loops: number, pool: number, shared: boolean, seconds: number) {
  const clients = Array.from({ length: loops }, () => connectEtcd(cluster.endpoints));
  const space = (loop: number) => Array.from({ length: pool }, (_, i) => (shared ? `r/${i}` : `r/${loop}/${i}`));
  // Preload, and every loop learns the mod_revisions of its key space.
  const preload = clients[0]!;
  const keysets = Array.from({ length: loops }, (_, l) => space(l));
  const distinct = [...new Set(keysets.flat())];
  for (let i = 0; i < distinct.length; i += 100) {
    await preload.kv.txn(
      { compare: [], success: distinct.slice(i, i + 100).map((k) => ({ request_put: { key: b(k), value: b(value300(k)) } })), failure: [] },
      { deadline: Date.now() + 30_000 },
    );
  }
  const caches = await Promise.all(
    keysets.map(async (ks) => {
      const m = new Map<string, string>();
      // keys_only: 30 000 values of 300 B would pass grpc-js's 4 MiB limit on a received message.
      const all = await preload.kv.range(
        { key: b(shared ? 'r/' : ks[0]!.replace(/\d+$/, '')), range_end: b(shared ? 'r0' : ks[0]!.replace(/\d+$/, '').slice(0, -1) + '0'), keys_only: true },
        { deadline: Date.now() + 30_000 },
      );
      for (const kv of all.kvs) m.set(kv.key.toString(), kv.mod_revision);
      return { m, rev: BigInt(all.header.revision) };
    }),
  );
  // As a cohort node would, each loop learns other loops' writes from a watch,
  // so its compares go stale only for the moment a change is in flight.
  const raise = (m: Map<string, string>, key: string, rev: string) => {
    if (BigInt(rev) > BigInt(m.get(key) ?? '0')) m.set(key, rev);
  };
  const watches = clients.map((client, l) =>
    watchFrom(client, shared ? 'r/' : `r/${l}/`, caches[l]!.rev + 1n, {
      onEvents: (evs) => {
        for (const ev of evs) raise(caches[l]!.m, ev.kv.key.toString(), ev.kv.mod_revision);
      },
      onCanceled: (e) => console.log(`watch canceled: ${e.message}`),
    }),
  );
  let stop = false;
  const stats = Array.from({ length: loops }, () => ({ txns: 0, committed: 0, conflicts: 0, staleKeys: 0, errors: 0 }));
  const started = Date.now();
  await Promise.all(
    clients.map(async (client, l) => {
      const ks = keysets[l]!;
      const cache = caches[l]!.m;
      const st = stats[l]!;
      while (!stop) {
        const pick = new Set<string>();
        while (pick.size < n) pick.add(ks[Math.floor(Math.random() * ks.length)]!);
        const batch = [...pick].map((key) => ({ key, expectModRev: cache.get(key) ?? '0', value: value300(`${key}@${l}`) }));
        try {
          const res = await client.kv.txn(groupCommitTxn(batch));
          st.txns++;
          if (res.succeeded) {
            st.committed += n;
            // Every put of one txn gets the txn's revision: the header's.
            for (const x of batch) raise(cache, x.key, res.header.revision);
          } else {
            st.conflicts++;
            res.responses.forEach((r, i) => {
              const kv = r.response_range?.kvs[0];
              const key = batch[i]!.key;
              const now = kv ? kv.mod_revision : '0';
              if (now !== batch[i]!.expectModRev) st.staleKeys++;
              raise(cache, key, now);
            });
          }
        } catch {
          st.errors++;
        }
        if (Date.now() - started > seconds * 1_000) stop = true;
      }
    }),
  );
  const secs = (Date.now() - started) / 1_000;
  await Promise.all(watches.map((w) => w.close()));
  for (const c of clients) c.close();
  const sum = (k: keyof (typeof stats)[0]) => stats.reduce((a, s) => a + s[k], 0);
  return {
    n,
    loops,
    pool,
    shared,
    txnsPerSec: Math.round(sum('txns') / secs),
    committedPutsPerSec: Math.round(sum('committed') / secs),
    committedTxnsPerSec: Math.round((sum('txns') - sum('conflicts')) / secs),
    conflictPct: +((100 * sum('conflicts')) / Math.max(1, sum('txns'))).toFixed(1),
    staleKeysPerConflict: +(sum('staleKeys') / Math.max(1, sum('conflicts'))).toFixed(2),
    errors: sum('errors'),
  };
}

async function txn(): Promise<void> {
  const seconds = num('seconds', 5);
  const runs = num('runs', 3);
  const cluster = await startEtcdCluster(clusterOpts());
  // Baseline: one serial txn (2 compares, 2 puts) at a time, through the vault's client and through etcd3 as is, interleaved.
  {
    const tuned = connectEtcd(cluster.endpoints);
    const raw = new Etcd3({ hosts: cluster.endpoints });
    const lat: Record<string, number[]> = { tuned: [], raw: [] };
    for (let i = 0; i < 400; i++) {
      const [name, c] = i % 2 ? (['raw', raw] as const) : (['tuned', tuned] as const);
      const t = performance.now();
      await c.kv.txn({
        compare: ['p/a', 'p/b'].map((k) => ({ key: b(k), target: 'Mod' as const, result: 'Less' as const, mod_revision: '999999999' })),
        success: ['p/a', 'p/b'].map((k) => ({ request_put: { key: b(k), value: b(value300(k)) } })),
        failure: [],
      });
      lat[name]!.push(performance.now() - t);
    }
    const p = (xs: number[], q: number) => [...xs].sort((x, y) => x - y)[Math.floor(q * (xs.length - 1))]!.toFixed(1);
    console.log(`serial CAS txn (2 compares, 2 puts), 200 each: vault client p50 ${p(lat.tuned!, 0.5)} ms p99 ${p(lat.tuned!, 0.99)} ms; etcd3 as is p50 ${p(lat.raw!, 0.5)} ms p99 ${p(lat.raw!, 0.99)} ms`);
    result('txn-serial', { tunedP50: +p(lat.tuned!, 0.5), tunedP99: +p(lat.tuned!, 0.99), rawP50: +p(lat.raw!, 0.5), rawP99: +p(lat.raw!, 0.99) });
    tuned.close();
    raw.close();
  }
  const configs: [number, number, number, boolean][] = [];
  for (const n of [8, 32]) {
    configs.push([n, 1, 10_000, false], [n, 3, 10_000, false], [n, 3, 10_000, true], [n, 3, 1_000, true], [n, 3, 100, true]);
  }
  try {
    for (const [n, loops, pool, shared] of configs) {
      const rs: Awaited<ReturnType<typeof groupCommitRun>>[] = [];
      for (let r = 0; r < runs; r++) rs.push(await groupCommitRun(cluster, n, loops, pool, shared, seconds));
      const m = (k: 'txnsPerSec' | 'committedPutsPerSec' | 'committedTxnsPerSec' | 'conflictPct' | 'staleKeysPerConflict') => median(rs.map((x) => x[k]));
      console.log(
        `N=${n} loops=${loops} ${shared ? `shared pool of ${pool}` : `own keys (${pool} each)`}: ${m('committedPutsPerSec')} committed puts/s, ${m('committedTxnsPerSec')} committed txns/s, ${m('txnsPerSec')} txns/s, ${m('conflictPct')} % conflicted (${m('staleKeysPerConflict')} stale keys per conflict); medians of ${runs} x ${seconds} s; runs: ${rs.map((x) => x.committedPutsPerSec).join(', ')}`,
      );
      result('txn', { runs: rs });
    }
  } finally {
    await cluster.stop();
  }
}

// ---------------------------------------------------------------------------
// Watch: replay from a revision with prev_kv, and the etcd3 1.1.2 pitfalls.

async function writeChanges(client: Etcd3, count: number, keys = 1_000): Promise<void> {
  const inflight: Promise<unknown>[] = [];
  for (let i = 0; i < count; i++) {
    inflight.push(client.put(`k/${String(i % keys).padStart(5, '0')}`).value(value300(`v${i}`)).exec());
    if (inflight.length >= 64) await Promise.all(inflight.splice(0));
  }
  await Promise.all(inflight);
}

async function watch(): Promise<void> {
  const changes = num('changes', 10_000);
  const cluster = await startEtcdCluster(clusterOpts());
  const client = connectEtcd(cluster.endpoints);
  process.on('uncaughtException', (e) => console.log(`UNCAUGHT: ${e.message}`));
  try {
    const r0 = BigInt((await client.get('k/').exec()).header.revision);
    await writeChanges(client, changes);
    // One txn of three puts: three events with one revision.
    await client.kv.txn({ compare: [], success: ['a', 'b', 'c'].map((x) => ({ request_put: { key: b(`k/txn-${x}`), value: b(x) } })), failure: [] });
    const head = BigInt((await client.get('k/').exec()).header.revision);
    const expected = changes + 3;

    // 1. Replay with prev_kv, measured, several times.
    const times: number[] = [];
    let facts: Record<string, unknown> = {};
    for (let run = 0; run < 5; run++) {
      const t0 = performance.now();
      let n = 0;
      let outOfOrder = 0;
      let lastRev = 0n;
      let withPrev = 0;
      let responses = 0;
      const headerRevs = new Set<string>();
      const sameRev = new Map<string, number>();
      const sub = await new Promise<ReturnType<typeof watchFrom>>((resolve) => {
        const s = watchFrom(client, 'k/', r0 + 1n, {
          onEvents(evs, hdr) {
            responses++;
            headerRevs.add(hdr.revision);
            for (const ev of evs) {
              const rev = BigInt(ev.kv.mod_revision);
              if (rev < lastRev) outOfOrder++;
              lastRev = rev;
              sameRev.set(ev.kv.mod_revision, (sameRev.get(ev.kv.mod_revision) ?? 0) + 1);
              if (ev.prev_kv) withPrev++;
              n++;
            }
            if (n >= expected) resolve(s);
          },
          onCanceled: (e) => console.log(`unexpected cancel: ${e.message}`),
        });
      });
      times.push(performance.now() - t0);
      await sub.close();
      facts = {
        events: n,
        responses,
        outOfOrder,
        withPrevKv: withPrev,
        revisionsWithSeveralEvents: [...sameRev.values()].filter((c) => c > 1).length,
        headerRevisionsSeen: [...headerRevs],
        head: String(head),
      };
    }
    console.log(`replay of ${expected} changes from r0+1 with prev_kv: median ${median(times).toFixed(0)} ms over 5 runs (${times.map((t) => t.toFixed(0)).join(', ')}); ${JSON.stringify(facts)}`);
    result('watch-replay', { expected, times, ...facts });

    // 2. etcd3's own resume skips history: break the stream mid-replay.
    for (const fixed of [false, true]) {
      const a = 0;
      const single = connectEtcd([cluster.endpoints[a]!]);
      let n = 0;
      const seen = new Set<string>();
      let broke = false;
      const ws = fixed
        ? watchFrom(single, 'k/', r0 + 1n, {
            onEvents: (evs) => {
              for (const ev of evs) seen.add(`${ev.kv.mod_revision}/${ev.kv.key}`);
              n += evs.length;
            },
            onCanceled: () => undefined,
          }).watcher
        : single.watch().prefix('k/').withPreviousKV().startRevision(String(r0 + 1n)).watcher();
      if (!fixed) {
        ws.on('data', (res) => {
          for (const ev of res.events) seen.add(`${ev.kv.mod_revision}/${ev.kv.key}`);
          n += res.events.length;
        });
        ws.on('error', () => undefined);
      }
      ws.once('data', () => {
        if (broke) return;
        broke = true;
        // Kill the only member this client talks to, right after the first batch.
        void cluster.restart(a);
      });
      const t0 = Date.now();
      while (Date.now() - t0 < 15_000 && !(broke && cluster.running(a) && n >= expected)) await sleep(100);
      await sleep(1_000);
      console.log(`stream broken after the first batch, ${fixed ? 'watchFrom (resume pinned to the last event)' : 'etcd3 as is'}: ${seen.size} distinct events of ${expected} delivered (${n} with repeats), resume point now ${ws.request.start_revision}`);
      result('watch-resume', { fixed, delivered: seen.size, expected, withRepeats: n });
      single.close();
    }
    await cluster.leader();

    // 3. Compaction: what a watch from below it gets.
    const compactAt = r0 + BigInt(Math.floor(changes / 2));
    await client.kv.compact({ revision: String(compactAt), physical: true });
    try {
      await client.get('k/00001').revision(String(r0 + 2n)).string();
    } catch (e) {
      console.log(`range at a compacted revision: ${(e as Error).constructor.name}: ${(e as Error).message}`);
    }
    for (const variant of ['fresh client', 'stream already carrying a watch'] as const) {
      const c2 = connectEtcd(cluster.endpoints);
      const other = variant === 'fresh client' ? undefined : await c2.watch().key('unrelated').create();
      const t0 = Date.now();
      const created = c2.watch().prefix('k/').startRevision(String(r0 + 1n)).create();
      const outcome = await Promise.race([
        created.then((w) => {
          w.on('error', () => undefined); // the cancel that follows 'connected' must not throw
          return 'resolved';
        }, (e: Error) => `rejected (${e.message})`),
        sleep(3_000).then(() => 'still pending after 3 s'),
      ]);
      console.log(`create() from below the compaction, ${variant}: ${outcome} (${Date.now() - t0} ms)`);

      const events: string[] = [];
      const w = c2.watch().prefix('k/').startRevision(String(r0 + 1n)).watcher();
      for (const ev of ['connected', 'data', 'disconnected', 'end'] as const) w.on(ev as 'end', () => events.push(ev));
      const errP = new Promise<Error>((r) => w.on('error', (e) => (events.push(`error: ${e.message}`), r(e))));
      await Promise.race([errP, sleep(3_000)]);
      const t1 = Date.now();
      const cancel = await Promise.race([w.cancel().then(() => 'resolved'), sleep(3_000).then(() => 'still pending after 3 s')]);
      console.log(`  .watcher() events: ${JSON.stringify(events)}; cancel() afterwards: ${cancel} (${Date.now() - t1} ms)`);
      result('watch-compacted', { variant, create: outcome, events, cancelAfterServerCancel: cancel });
      if (other) {
        // The watch that shared the stream: does the client still work for it?
        const ok = await Promise.race([other.cancel().then(() => 'cancel() resolved'), sleep(3_000).then(() => 'cancel() still pending after 3 s: the stream is wedged')]);
        console.log(`  the other watch on that stream: ${ok}`);
      }
      c2.close();
    }
    // watchFrom on a compacted start: onCanceled fires; the node then rebuilds from a snapshot.
    const t2 = Date.now();
    const why = await Promise.race([
      new Promise<string>((r) => watchFrom(client, 'k/', r0 + 1n, { onEvents: () => undefined, onCanceled: (e) => r(`onCanceled: "${e.message}"`) })),
      sleep(5_000).then(() => 'nothing'),
    ]);
    console.log(`watchFrom from a compacted start: ${why} after ${Date.now() - t2} ms`);
  } finally {
    client.close();
    await cluster.stop();
  }
}

// ---------------------------------------------------------------------------
// A consistent snapshot: a range at one revision, paged by key continuation.

/** Every key under `prefix` as of `revision`, page by page (limit + the key after the last one seen). */
export async function* snapshotPages(client: Etcd3, prefix: string, revision: string, limit: number, serializable = false) {
  const end = b(prefix.slice(0, -1) + String.fromCharCode(prefix.charCodeAt(prefix.length - 1) + 1));
  let from = b(prefix);
  for (;;) {
    const req: IRangeRequest = { key: from, range_end: end, revision, limit: String(limit), serializable };
    const res = await client.kv.range(req, { deadline: Date.now() + 10_000 });
    yield res.kvs;
    if (!res.more || res.kvs.length === 0) return;
    from = Buffer.concat([res.kvs[res.kvs.length - 1]!.key, Buffer.from([0])]);
  }
}

function dirBytes(d: string): number {
  let t = 0;
  for (const e of readdirSync(d, { withFileTypes: true })) t += e.isDirectory() ? dirBytes(join(d, e.name)) : statSync(join(d, e.name)).size;
  return t;
}

async function snapshot(): Promise<void> {
  const keys = num('keys', 100_000);
  const cluster = await startEtcdCluster(clusterOpts());
  const client = connectEtcd(cluster.endpoints);
  try {
    const s0 = await cluster.status(0);
    const t0 = performance.now();
    const inflight: Promise<unknown>[] = [];
    for (let i = 0; i < keys; i += 100) {
      const batch = Array.from({ length: Math.min(100, keys - i) }, (_, k) => `s/${String(i + k).padStart(7, '0')}`);
      inflight.push(client.kv.txn({ compare: [], success: batch.map((k) => ({ request_put: { key: b(k), value: b(value300(k)) } })), failure: [] }, { deadline: Date.now() + 30_000 }));
      if (inflight.length >= 8) await Promise.all(inflight.splice(0));
    }
    await Promise.all(inflight);
    const loadMs = performance.now() - t0;
    const rev = (await client.get('s/').exec()).header.revision;
    // Later history: a tenth of the keys change after the snapshot revision.
    for (let i = 0; i < keys; i += 1000) await client.put(`s/${String(i).padStart(7, '0')}`).value('changed later');
    console.log(`loaded ${keys} keys of 300 B in ${(loadMs / 1000).toFixed(1)} s (txns of 100 puts, 8 in flight); snapshot revision ${rev}`);

    for (const limit of [1_000, 5_000, 10_000, 20_000]) {
      for (const serializable of [false, true]) {
        const times: number[] = [];
        let count = 0;
        let changed = 0;
        let error = '';
        for (let run = 0; run < 3 && !error; run++) {
          const t = performance.now();
          count = 0;
          changed = 0;
          try {
            for await (const page of snapshotPages(client, 's/', rev, limit, serializable)) {
              count += page.length;
              for (const kv of page) if (kv.value.toString() === 'changed later') changed++;
            }
            times.push(performance.now() - t);
          } catch (e) {
            error = (e as Error).message.slice(0, 160);
          }
        }
        console.log(
          error
            ? `  limit ${limit}${serializable ? ' serializable' : ''}: ${error}`
            : `  limit ${limit}${serializable ? ' serializable' : ''}: ${count} keys at revision ${rev} in median ${median(times).toFixed(0)} ms (${times.map((x) => x.toFixed(0)).join(', ')}); ${changed} show later values (must be 0)`,
        );
        result('snapshot', { keys, limit, serializable, times, count, changed, error });
      }
    }

    // Size: status.dbSize is the bbolt file; dbSizeInUse what its pages hold.
    const st = await Promise.all([0, 1, 2].map((i) => cluster.status(i)));
    const statusRaw = await (await fetch(`${cluster.endpoints[0]}/v3/maintenance/status`, { method: 'POST', body: '{}' })).json() as { dbSize: string; dbSizeInUse: string };
    const m0 = cluster.members[0]!;
    const walBytes = dirBytes(join(m0.dataDir, 'member/wal'));
    const snapBytes = dirBytes(join(m0.dataDir, 'member/snap'));
    const per = (x: number) => ((x - s0.dbSize) / keys).toFixed(0);
    console.log(`db after ${keys} keys + ${keys / 1000} overwrites: dbSize ${(Number(statusRaw.dbSize) / 2 ** 20).toFixed(1)} MiB (${per(Number(statusRaw.dbSize))} B/key), in use ${(Number(statusRaw.dbSizeInUse) / 2 ** 20).toFixed(1)} MiB (${per(Number(statusRaw.dbSizeInUse))} B/key); members ${st.map((x) => (x.dbSize / 2 ** 20).toFixed(1)).join('/')} MiB; wal dir ${(walBytes / 2 ** 20).toFixed(0)} MiB, snap dir ${(snapBytes / 2 ** 20).toFixed(1)} MiB`);
    // Overwrite everything once: history doubles the data until compaction and defrag.
    for (let i = 0; i < keys; i += 100) {
      const batch = Array.from({ length: Math.min(100, keys - i) }, (_, k) => `s/${String(i + k).padStart(7, '0')}`);
      inflight.push(client.kv.txn({ compare: [], success: batch.map((k) => ({ request_put: { key: b(k), value: b(value300(k + '2')) } })), failure: [] }, { deadline: Date.now() + 30_000 }));
      if (inflight.length >= 8) await Promise.all(inflight.splice(0));
    }
    await Promise.all(inflight);
    const sizes = async () => {
      const r = await (await fetch(`${cluster.endpoints[0]}/v3/maintenance/status`, { method: 'POST', body: '{}' })).json() as { dbSize: string; dbSizeInUse: string; header: { revision: string } };
      return { dbMiB: +(Number(r.dbSize) / 2 ** 20).toFixed(1), inUseMiB: +(Number(r.dbSizeInUse) / 2 ** 20).toFixed(1), revision: r.header.revision };
    };
    const afterOverwrite = await sizes();
    const tc = performance.now();
    await client.kv.compact({ revision: afterOverwrite.revision, physical: true }, { deadline: Date.now() + 60_000 });
    const compactMs = performance.now() - tc;
    await sleep(500);
    const afterCompact = await sizes();
    const one = connectEtcd([cluster.endpoints[0]!]);
    const td = performance.now();
    await one.maintenance.defragment({ deadline: Date.now() + 60_000 });
    const defragMs = performance.now() - td;
    one.close();
    const afterDefrag = await sizes();
    console.log(`every key overwritten once: ${JSON.stringify(afterOverwrite)}; compacted (${compactMs.toFixed(0)} ms, physical): ${JSON.stringify(afterCompact)}; defragmented (member 1, ${defragMs.toFixed(0)} ms, blocks that member meanwhile): ${JSON.stringify(afterDefrag)}`);
    result('size', { keys, dbSize: Number(statusRaw.dbSize), dbSizeInUse: Number(statusRaw.dbSizeInUse), baseline: s0.dbSize, walBytes, snapBytes, afterOverwrite, afterCompact, compactMs, afterDefrag, defragMs, loadMs });
  } finally {
    client.close();
    await cluster.stop();
  }
}

// ---------------------------------------------------------------------------
// Identity: cluster id and member ids from response headers.

async function ids(): Promise<void> {
  const token = `bkv-probe-${randomBytes(4).toString('hex')}`;
  const cluster = await startEtcdCluster({ ...clusterOpts(), token });
  const client = connectEtcd(cluster.endpoints);
  const seen = new Set<string>();
  let clusterId = '';
  for (let i = 0; i < 12; i++) {
    const h = (await client.get('x').exec()).header;
    clusterId = h.cluster_id;
    seen.add(h.member_id);
  }
  const put = await client.put('x').value('1').exec();
  const tx = await client.kv.txn({ compare: [], success: [], failure: [] });
  const st = await client.maintenance.status();
  const ml = await client.cluster.memberList({});
  console.log(`cluster_id ${clusterId} on get/put/txn/status headers: ${[put.header.cluster_id, tx.header.cluster_id, st.header.cluster_id].every((x) => x === clusterId)}`);
  console.log(`member_id varies with the member that answered: ${seen.size} distinct over 12 gets; members ${JSON.stringify(ml.members.map((m) => ({ ID: m.ID, name: m.name })))}; status.leader ${st.leader}`);
  // Same token and same peer URLs on fresh data dirs: the same cluster id.
  const ports = cluster.members.flatMap((m) => [Number(new URL(m.clientUrl).port), Number(new URL(m.peerUrl).port)]);
  client.close();
  await cluster.stop();
  const again = await startEtcdCluster({ ...clusterOpts(), token, ports });
  const c2 = connectEtcd(again.endpoints);
  const h2 = (await c2.get('x').exec()).header;
  const ml2 = await c2.cluster.memberList({});
  console.log(`a new, empty cluster with the same token and peer URLs: cluster_id ${h2.cluster_id} (${h2.cluster_id === clusterId ? 'SAME' : 'different'}), member ids ${ml2.members.every((m) => ml.members.some((o) => o.ID === m.ID)) ? 'the same' : 'different'}, revision ${h2.revision}`);
  result('ids', { clusterId, distinctMembersSeen: seen.size, sameIdOnRecreate: h2.cluster_id === clusterId });
  c2.close();
  await again.stop();
}

const commands: Record<string, () => Promise<void>> = { stall, churn, txn, watch, snapshot, ids };
const run = commands[cmd];
if (!run) {
  console.log('usage: npx tsx bench/etcd-probe.ts stall|txn|watch|snapshot|ids [options]  (see the header of this file)');
  process.exit(cmd === 'help' ? 0 : 2);
}
console.log(`etcd probe ${cmd}: ${new Date().toISOString()}, load average ${loadavg().map((x) => x.toFixed(2)).join(' ')}, CPU pressure ${cpuPressure()} %`);
await run();
// A wedged etcd3 watch stream (see watch) can keep the loop alive: the probe is done.
process.exit(0);
