// scripts/bench: one run that measures the vault against its HSM, against a
// reference OPAQUE server, over time (memory) and at scale, all on this
// machine, side by side. Prints a table and writes JSON (and the same tables
// as Markdown) under bench/results/. A benchmark, not a test.
//
//   ./scripts/bench [--quick] [--users N] [--seconds S] [--reps R]
//                   [--rss-recoveries N] [--scale-records N] [--threads T]
//                   [--concurrency C] [--skip ceiling,peer,direct,latency,sdk,enroll,rss,scale] [--keep]
//                   [--malloc libc]   (servers run on jemalloc when installed, as ./scripts/start does)
//
// Phases (each throughput is the median of --reps interleaved runs):
//   1 HSM ceiling     the PKCS#11 sequence of one recovery, T threads, no network/DB
//   2 vault e2e       recoveries/s (closed loop) over WebSocket from a separate
//                     load-generator process; latency at 5 (floor)/25/50/90 % of that max
//                     (open loop); enrolments/s; the same with the anchor write
//                     disabled and with HSM calls on the main thread
//   3 reference peer  plain OPAQUE login server (@serenity-kit/opaque), same ws + SQLite
//   4 memory          daemon RSS across N recoveries (and without the HSM recycle)
//   5 scale           bulk-load to N records: startup, DB bytes/record, recover/s vs 10 k
import { cpSync, existsSync, mkdirSync, mkdtempSync, readdirSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { availableParallelism, cpus, tmpdir, totalmem } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { execFileSync } from 'node:child_process';
import Database from 'better-sqlite3';
import { spawnJson, type JsonProc } from './lib/proc.js';
import { coreBound, median, round, slope, table, type Latency } from './lib/stats.js';
import { BENCH_KDF } from './lib/config.js';
import type { Spec } from './loadgen.js';

const HERE = dirname(fileURLToPath(import.meta.url));
const ROOT = resolve(HERE, '../..');
const script = (name: string) => join(HERE, `${name}.js`);

const { values: argv } = parseArgs({
  options: {
    quick: { type: 'boolean' },
    users: { type: 'string' },
    seconds: { type: 'string' },
    reps: { type: 'string' },
    'rss-recoveries': { type: 'string' },
    'scale-records': { type: 'string' },
    threads: { type: 'string' },
    concurrency: { type: 'string' },
    skip: { type: 'string' },
    keep: { type: 'boolean' },
    out: { type: 'string' },
    malloc: { type: 'string' },
  },
});
const quick = !!argv.quick;
const num = (v: string | undefined, d: number) => (v === undefined ? d : Number(v));
const O = {
  users: num(argv.users, quick ? 2000 : 10_000),
  seconds: num(argv.seconds, quick ? 4 : 10),
  reps: num(argv.reps, quick ? 1 : 3),
  rssRecoveries: num(argv['rss-recoveries'], quick ? 20_000 : 1_000_000),
  scaleRecords: num(argv['scale-records'], quick ? 50_000 : 1_000_000),
  threads: num(argv.threads, availableParallelism()),
  concurrency: num(argv.concurrency, 64),
  skip: new Set((argv.skip ?? '').split(',').filter(Boolean)),
  out: argv.out ?? join(ROOT, 'bench/results'),
};
const on = (phase: string) => !O.skip.has(phase);
const log = (s: string) => process.stderr.write(`[bench ${new Date().toISOString().slice(11, 19)}] ${s}\n`);

// ---- processes --------------------------------------------------------------------

interface Server {
  name: string;
  p: JsonProc;
  url: string;
  token?: string;
  dataDir: string;
  ready: Record<string, unknown>;
  spawnToReadyMs: number;
  /** `steps`: start or stop timing requests inside the daemon (bench/server.ts). */
  stats(reset?: boolean, steps?: 'start' | 'stop'): Promise<ServerStats>;
  stop(): Promise<void>;
}

interface ServerStats {
  rss: number;
  cpuUserMs: number;
  cpuSystemMs: number;
  pool?: { recycles: number; recycleMsMax: number; recycleMsTotal: number; derives: number; overloaded: number; jobs: number; batches: number };
  loop?: { delayP50Ms: number; delayP99Ms: number; delayMaxMs: number; gcMs: number; gcMaxMs: number };
  ledger?: { seq: number; anchored: number };
  stepMs?: Record<string, Latency>;
}

/** jemalloc, as ./scripts/start and the image run the daemon (docs/OPERATIONS.md); `--malloc libc` to compare. */
function jemallocPath(): string | undefined {
  if (argv.malloc === 'libc') return undefined;
  try {
    return execFileSync(join(ROOT, 'scripts/lib/jemalloc-path'), { encoding: 'utf8' }).trim() || undefined;
  } catch {
    return undefined;
  }
}
const JEMALLOC = jemallocPath();

const serverEnv = (extra: NodeJS.ProcessEnv = {}): NodeJS.ProcessEnv => {
  const preload = JEMALLOC ? { LD_PRELOAD: [JEMALLOC, process.env.LD_PRELOAD].filter(Boolean).join(':') } : {};
  const env: NodeJS.ProcessEnv = { ...process.env, ...preload, BKV_HSM_WORKERS: String(O.threads), ...extra };
  delete env.SOFTHSM2_CONF;
  for (const [k, v] of Object.entries(extra)) if (v === undefined) delete env[k];
  return env;
};

async function startVault(name: string, dataDir: string, opts: { init?: boolean; noAnchor?: boolean; env?: NodeJS.ProcessEnv } = {}): Promise<Server> {
  const args = ['--data', dataDir, ...(opts.init ? ['--init'] : []), ...(opts.noAnchor ? ['--no-anchor'] : [])];
  const t0 = performance.now();
  const p = spawnJson(script('server'), args, serverEnv(opts.env));
  const ready = await p.next((m) => m.event === 'ready', 300_000);
  const spawnToReadyMs = Math.round(performance.now() - t0);
  return {
    name,
    p,
    url: `ws://127.0.0.1:${ready.port as number}`,
    token: ready.token as string,
    dataDir,
    ready,
    spawnToReadyMs,
    stats: (reset = false, steps?: 'start' | 'stop') => p.ask<ServerStats>({ cmd: 'stats', resetCpu: reset, ...(steps ? { steps } : {}) }),
    async stop() {
      await p.ask({ cmd: 'stop' }, 60_000).catch(() => undefined);
      await p.exited;
    },
  };
}

async function startPeer(dataDir: string): Promise<Server> {
  const t0 = performance.now();
  // The same allocator as the vault: like for like.
  const p = spawnJson(script('peer'), ['--data', dataDir], serverEnv());
  const ready = await p.next((m) => m.event === 'ready', 60_000);
  return {
    name: 'peer',
    p,
    url: `ws://127.0.0.1:${ready.port as number}`,
    dataDir,
    ready,
    spawnToReadyMs: Math.round(performance.now() - t0),
    stats: (reset = false) => p.ask<ServerStats>({ cmd: 'stats', resetCpu: reset }),
    async stop() {
      await p.ask({ cmd: 'stop' }).catch(() => undefined);
      await p.exited;
    },
  };
}

interface LoadResult {
  ops: number;
  total: number;
  seconds: number;
  rate: number;
  errors: Record<string, number>;
  latencyMs: Latency;
  loadgenCpuMs: number;
  /** Server CPU (all its threads) per completed flow, including warm-up flows. */
  serverCpuUsPerOp?: number;
  anchorsPerOp?: number;
  /** The daemon's event-loop delay and GC pauses during the run. */
  serverLoop?: ServerStats['loop'];
  recyclesDuring?: number;
  /** Time in the daemon per request (frame in → answer sent), by method. */
  daemonStepMs?: Record<string, Latency>;
}

async function load(s: Server, spec: Omit<Spec, 'url' | 'token'>, onProgress?: (n: number) => void, timeSteps = true): Promise<LoadResult> {
  const st0 = await s.stats(true, timeSteps ? 'start' : undefined);
  const p = spawnJson(script('loadgen'), [JSON.stringify({ ...spec, url: s.url, token: s.token })]);
  if (onProgress) p.onMessage((m) => typeof m.progress === 'number' && onProgress(m.progress));
  const r = (await p.next<{ result: LoadResult }>((m) => 'result' in m, 3_600_000)).result;
  const st = await s.stats(false, timeSteps ? 'stop' : undefined);
  r.serverCpuUsPerOp = Math.round(((st.cpuUserMs + st.cpuSystemMs) * 1000) / Math.max(1, r.total));
  // Group commit: HSM anchor writes (= ledger batches) per flow.
  if (st.ledger && st0.ledger) r.anchorsPerOp = round((st.ledger.seq - st0.ledger.seq) / Math.max(1, r.total), 3);
  if (st.loop) r.serverLoop = st.loop;
  if (st.stepMs) r.daemonStepMs = st.stepMs;
  if (st.pool && st0.pool) r.recyclesDuring = st.pool.recycles - st0.pool.recycles;
  const errs = Object.entries(r.errors);
  if (errs.length) log(`  ${s.name}: errors ${errs.map(([k, v]) => `${k}×${v}`).join(' ')}`);
  return r;
}

/** Recoveries/s of the bare PKCS#11 sequence, and the CPU its threads spent per recovery (µs; null off Linux). */
async function ceiling(dataDir: string, threads: number, anchorEvery = 0): Promise<{ rate: number; cpuUs: number | null }> {
  const p = spawnJson(script('hsm-ceiling'), [JSON.stringify({ dataDir, threads, seconds: O.seconds, anchorEvery })], serverEnv());
  const r = await p.next<{ result: { recoveriesPerSec: number; cpuUsPerRecovery: number | null } }>((m) => 'result' in m, 600_000);
  return { rate: r.result.recoveriesPerSec, cpuUs: r.result.cpuUsPerRecovery };
}

async function singleOps(dataDir: string): Promise<Record<string, number>> {
  const p = spawnJson(script('hsm-ceiling'), [JSON.stringify({ dataDir, singleOps: true, seconds: quick ? 1 : 2 })], serverEnv());
  return (await p.next<{ result: { singleThreadOpsPerSec: Record<string, number> } }>((m) => 'result' in m, 600_000)).result.singleThreadOpsPerSec;
}

/** A stopped vault's data folder, copied: same token (keys) and database, its own SoftHSM config. */
function copyVault(src: string, dst: string): void {
  rmSync(dst, { recursive: true, force: true });
  cpSync(src, dst, { recursive: true });
  // The embedded config names the token folder by absolute path: let the copy write its own.
  rmSync(join(dst, 'softhsm2.conf'), { force: true });
  for (const f of readdirSync(dst)) if (/\.lock$|^admin\.json$|^admin-token$/.test(f)) rmSync(join(dst, f), { force: true });
}

function dbBytes(dataDir: string): number {
  const path = join(dataDir, 'vault.db');
  const db = new Database(path);
  db.pragma('wal_checkpoint(TRUNCATE)');
  db.close();
  let n = 0;
  for (const f of [path, `${path}-wal`, `${path}-shm`]) if (existsSync(f)) n += statSync(f).size;
  return n;
}

const closed = (seconds: number, concurrency = O.concurrency) => ({ type: 'closed' as const, concurrency, seconds });
/** Open-loop loads, in % of the measured maximum, at which latency is measured. */
const LATENCY_LOADS = [5, 25, 50, 90];
const conns = (concurrency: number) => Math.max(2, Math.ceil(concurrency / 32));

// ---- the run ------------------------------------------------------------------------

async function main(): Promise<void> {
  const work = mkdtempSync(join(tmpdir(), 'bkv-bench-'));
  const started = new Date();
  const machine = {
    cpus: cpus().length,
    cpuModel: cpus()[0]?.model ?? '?',
    availableParallelism: availableParallelism(),
    memGiB: round(totalmem() / 2 ** 30, 1),
    node: process.version,
    softhsm: softhsmVersion(),
    malloc: JEMALLOC ? 'jemalloc' : 'libc',
    loadAvgAtStart: (await import('node:os')).loadavg().map((x) => round(x, 2)),
  };
  const R: Record<string, unknown> = { started: started.toISOString(), options: { ...O, skip: [...O.skip], quick }, machine, kdf: BENCH_KDF };
  log(`work dir ${work}; ${JSON.stringify(R.options)}`);
  const servers: Server[] = [];
  try {
    // ---- set-up: one vault, O.users enrolled over the wire ----
    const V = join(work, 'vault');
    let vault = await startVault('vault', V, { init: true });
    servers.push(vault);
    log(`enrolling ${O.users} users over WebSocket`);
    const enrolSetup = await load(vault, { target: 'vault', op: 'enroll', from: 0, to: O.users, load: { type: 'closed', concurrency: 32 }, connections: 2 });
    R.enrolSetup = enrolSetup;
    log(`  ${enrolSetup.rate} enrolments/s`);
    if (on('sdk')) {
      const n = quick ? 100 : 300;
      log(`enrolling ${n} SDK users (real client crypto, Argon2id m=${BENCH_KDF.m} KiB t=${BENCH_KDF.t} p=${BENCH_KDF.p})`);
      await load(vault, { target: 'sdk', op: 'enroll', vaultKeyFile: join(V, 'vault-key.pub'), from: 0, to: n, load: { type: 'closed', concurrency: 8 }, connections: 2 });
      R.sdkUsers = n;
    }
    await vault.stop();
    servers.splice(servers.indexOf(vault), 1);
    R.dbBytesPerRecordAt = { [O.users]: round(dbBytes(V) / O.users, 1) };
    copyVault(V, join(work, 'vault-noanchor'));
    copyVault(V, join(work, 'vault-direct'));
    const ceilingDir = join(work, 'ceiling');

    vault = await startVault('vault', V);
    servers.push(vault);
    const noAnchor = await startVault('vault-noanchor', join(work, 'vault-noanchor'), { noAnchor: true });
    servers.push(noAnchor);
    const direct = on('direct') ? await startVault('vault-direct', join(work, 'vault-direct'), { env: { BKV_HSM_WORKERS: 'off' } }) : undefined;
    if (direct) servers.push(direct);
    const peer = on('peer') ? await startPeer(join(work, 'peer')) : undefined;
    if (peer) servers.push(peer);
    if (peer) {
      const n = Math.min(O.users, quick ? 500 : 2000);
      log(`registering ${n} users on the OPAQUE peer`);
      R.peerRegister = await load(peer, { target: 'peer', op: 'register', from: 0, to: n, load: { type: 'closed', concurrency: 16 }, connections: 2 });
      R.peerUsers = n;
    }

    // ---- 1-3: side by side, interleaved ----
    if (on('ceiling')) {
      log('HSM single-call rates (1 thread)');
      R.hsmSingleThreadOpsPerSec = await singleOps(ceilingDir);
    }
    const reps: Record<string, number[]> = { ceiling: [], ceiling1: [], ceilingAnchor: [], vault: [], noAnchor: [], direct: [], peer: [] };
    const ceilingCpuUs: number[] = [];
    const runs: Record<string, LoadResult[]> = { vault: [], noAnchor: [], direct: [], peer: [] };
    const recoverSpec = (from: number, to: number, concurrency = O.concurrency): Omit<Spec, 'url' | 'token'> => ({
      target: 'vault',
      op: 'recover',
      from,
      to,
      load: closed(O.seconds, concurrency),
      connections: conns(concurrency),
    });
    for (let r = 0; r < O.reps; r++) {
      log(`side-by-side round ${r + 1}/${O.reps}`);
      if (on('ceiling')) {
        const c = await ceiling(ceilingDir, O.threads);
        reps.ceiling!.push(c.rate);
        if (c.cpuUs !== null) ceilingCpuUs.push(c.cpuUs);
        log(`  HSM ceiling (${O.threads} threads): ${c.rate} recoveries/s, ${c.cpuUs ?? '?'} µs CPU per recovery`);
      }
      const v = await load(vault, recoverSpec(0, O.users));
      runs.vault!.push(v);
      reps.vault!.push(v.rate);
      log(`  vault: ${v.rate} recoveries/s (p50 ${v.latencyMs.p50} ms, server CPU ${v.serverCpuUsPerOp} µs/recovery)`);
      const na = await load(noAnchor, recoverSpec(0, O.users));
      runs.noAnchor!.push(na);
      reps.noAnchor!.push(na.rate);
      log(`  vault without anchor: ${na.rate} recoveries/s`);
      if (direct) {
        const dr = await load(direct, recoverSpec(0, O.users));
        runs.direct!.push(dr);
        reps.direct!.push(dr.rate);
        log(`  vault, HSM on the main thread: ${dr.rate} recoveries/s`);
      }
      if (peer) {
        const pr = await load(peer, { target: 'peer', op: 'login', from: 0, to: R.peerUsers as number, load: closed(O.seconds), connections: conns(O.concurrency) });
        runs.peer!.push(pr);
        reps.peer!.push(pr.rate);
        log(`  OPAQUE peer: ${pr.rate} logins/s (server CPU ${pr.serverCpuUsPerOp} µs/login)`);
      }
      if (on('ceiling') && r === 0) {
        reps.ceiling1!.push((await ceiling(ceilingDir, 1)).rate);
        // Anchor writes are serialised in the vault (one per group commit); SoftHSM fails
        // concurrent C_SetAttributeValue on one object, so this variant is single-threaded.
        reps.ceilingAnchor!.push((await ceiling(ceilingDir, 1, 1)).rate);
        log(`  HSM ceiling 1 thread: ${reps.ceiling1![0]}/s; 1 thread with one anchor write per recovery: ${reps.ceilingAnchor![0]}/s`);
      }
    }
    const med = (k: string) => (reps[k]!.length ? median(reps[k]!) : NaN);
    const vaultMax = med('vault');
    const byRun = (f: (rs: LoadResult[]) => number) => Object.fromEntries(Object.entries(runs).map(([k, rs]) => [k, f(rs)]));
    const serverCpuUsPerOp = byRun((rs) => median(rs.map((x) => x.serverCpuUsPerOp ?? NaN)));
    const loadgenCpuUsPerOp = byRun((rs) => median(rs.map((x) => Math.round((x.loadgenCpuMs * 1000) / Math.max(1, x.total)))));
    const hsmCpuUs = median(ceilingCpuUs);
    const vaultCpuUs = serverCpuUsPerOp.vault!;
    const loadgenCpuUs = loadgenCpuUsPerOp.vault!;
    const cores = availableParallelism();
    R.sideBySide = {
      reps,
      median: Object.fromEntries(Object.keys(reps).map((k) => [k, round(med(k), 1)])),
      vaultOverCeiling: round(vaultMax / med('ceiling'), 3),
      vaultOverCeilingPerRep: reps.vault!.map((v, i) => round(v / (reps.ceiling![i] ?? NaN), 3)),
      anchorCost: round(1 - vaultMax / med('noAnchor'), 3),
      vaultOverDirect: round(vaultMax / med('direct'), 3),
      vaultOverPeer: round(vaultMax / med('peer'), 3),
      serverCpuUsPerOp,
      loadgenCpuUsPerOp,
      ceilingCpuUsPerRecovery: hsmCpuUs,
      // How far the throughput target can be reached on this machine at all (see coreBound).
      bound: Number.isFinite(hsmCpuUs)
        ? {
            cores,
            hsmCpuUs,
            loadgenCpuUs,
            daemonSelfCpuUs: Math.round(vaultCpuUs - hsmCpuUs),
            // a daemon that added no CPU to its HSM calls, with this load generator beside it
            freeDaemon: coreBound({ cores, ceilingPerSec: med('ceiling'), cpuUs: hsmCpuUs + loadgenCpuUs }),
            // this daemon, with the load generator on another machine
            loadgenElsewhere: coreBound({ cores, ceilingPerSec: med('ceiling'), cpuUs: vaultCpuUs }),
          }
        : undefined,
      runs,
    };

    // ---- latency at 5 / 25 / 50 / 90 % of the measured maximum ----
    // 5 % is the floor: the cores nearly idle, so it shows what one recovery costs
    // with no queueing; three times as long, so its p99 rests on a few hundred flows.
    if (on('latency')) {
      const lat: Record<string, unknown> = {};
      for (const pct of LATENCY_LOADS) {
        const rate = Math.max(1, Math.round((vaultMax * pct) / 100));
        const seconds = pct === 5 ? 3 * O.seconds : O.seconds;
        log(`latency at ${pct} % of max (${rate} recoveries/s, open loop, ${seconds} s)`);
        const one = await load(vault, { target: 'vault', op: 'recover', from: 0, to: O.users, load: { type: 'open', rate, seconds }, connections: 4 });
        const row: Record<string, unknown> = { rate, vault: one };
        if (direct) row.direct = await load(direct, { target: 'vault', op: 'recover', from: 0, to: O.users, load: { type: 'open', rate, seconds }, connections: 4 });
        lat[pct] = row;
        log(`  p50 ${one.latencyMs.p50} p99 ${one.latencyMs.p99} p99.9 ${one.latencyMs.p999} ms`);
      }
      R.latency = lat;
    }

    // ---- enrolments/s ----
    if (on('enroll')) {
      log('enrolments/s (closed loop, new users)');
      R.enroll = await load(vault, { target: 'vault', op: 'enroll', from: 5_000_000, to: 6_000_000, load: closed(O.seconds), connections: conns(O.concurrency) });
      log(`  ${(R.enroll as LoadResult).rate} enrolments/s`);
    }

    // ---- real SDK clients (client-side OPRF and Argon2id in the load generator) ----
    if (on('sdk') && R.sdkUsers) {
      log('recoveries/s with the real SDK client');
      R.sdkRecover = await load(vault, { target: 'sdk', op: 'recover', vaultKeyFile: join(V, 'vault-key.pub'), from: 0, to: R.sdkUsers as number, load: closed(O.seconds, 16), connections: 4 });
      log(`  ${(R.sdkRecover as LoadResult).rate} recoveries/s`);
    }

    for (const s of [noAnchor, direct, peer]) if (s) {
      await s.stop();
      servers.splice(servers.indexOf(s), 1);
    }

    // ---- memory across many recoveries ----
    if (on('rss')) R.rss = await rssRun(vault, O.rssRecoveries, 'with recycle');
    await vault.stop();
    servers.splice(servers.indexOf(vault), 1);
    if (on('rss')) {
      const dir = join(work, 'vault-norecycle');
      copyVault(V, dir);
      const nr = await startVault('vault-norecycle', dir, { env: { BKV_HSM_RECYCLE: '0' } });
      servers.push(nr);
      R.rssNoRecycle = await rssRun(nr, Math.min(O.rssRecoveries, quick ? 20_000 : 100_000), 'recycle off');
      await nr.stop();
      servers.splice(servers.indexOf(nr), 1);
    }

    // ---- scale ----
    if (on('scale')) {
      const small = join(work, 'vault-small');
      copyVault(V, small);
      log(`bulk-loading ${O.users}..${O.scaleRecords} (${O.scaleRecords - O.users} records) through the HSM and Ledger.put`);
      const bulk = spawnJson(script('bulk'), [JSON.stringify({ dataDir: V, from: O.users, to: O.scaleRecords })], serverEnv());
      let lastLog = 0;
      bulk.onMessage((m) => {
        if (typeof m.progress === 'number' && (m.t as number) - lastLog > 15_000) {
          lastLog = m.t as number;
          log(`  ${m.progress} loaded (${Math.round(((m.progress as number) * 1000) / (m.t as number))}/s)`);
        }
      });
      R.bulk = (await bulk.next<{ result: unknown }>((m) => 'result' in m, 24 * 3_600_000)).result;
      const scale: Record<string, unknown> = { dbBytes: { small: dbBytes(small), big: dbBytes(V) } };
      const records: Record<string, number> = {};
      const startups: Record<string, { spawnToReadyMs: number; startupMs: number; openMs: number }[]> = { small: [], big: [] };
      const rates: Record<string, number[]> = { small: [], big: [] };
      const lat: Record<string, LoadResult[]> = { small: [], big: [] };
      // More rounds than the other figures: two 10-second runs on this shared machine differ by up to 25 %.
      const scaleReps = quick ? O.reps : Math.max(O.reps, 5);
      for (let r = 0; r < scaleReps; r++) {
        for (const [k, dir, users] of [['small', small, O.users], ['big', V, O.scaleRecords]] as const) {
          const s = await startVault(`vault-${k}`, dir);
          servers.push(s);
          records[k] = s.ready.records as number;
          startups[k]!.push({ spawnToReadyMs: s.spawnToReadyMs, startupMs: s.ready.startupMs as number, openMs: s.ready.openMs as number });
          const res = await load(s, recoverSpec(0, users));
          rates[k]!.push(res.rate);
          lat[k]!.push(res);
          log(`  ${k} (${users} users): start-up ${s.spawnToReadyMs} ms, ${res.rate} recoveries/s`);
          await s.stop();
          servers.splice(servers.indexOf(s), 1);
        }
      }
      const bytes = scale.dbBytes as { small: number; big: number };
      Object.assign(scale, {
        records: { small: records.small, big: records.big },
        dbBytesPerRecord: { small: round(bytes.small / records.small!, 1), big: round(bytes.big / records.big!, 1) },
        startups,
        startupMedianMs: { small: median(startups.small!.map((x) => x.spawnToReadyMs)), big: median(startups.big!.map((x) => x.spawnToReadyMs)) },
        recoverRates: rates,
        recoverMedian: { small: median(rates.small!), big: median(rates.big!) },
        bigOverSmall: round(median(rates.big!) / median(rates.small!), 3),
        // Server CPU per recovery is steadier than the rate: the same comparison, read from cost.
        cpuUsPerOpMedian: { small: median(lat.small!.map((x) => x.serverCpuUsPerOp!)), big: median(lat.big!.map((x) => x.serverCpuUsPerOp!)) },
        runs: lat,
      });
      R.scale = scale;
    }
  } finally {
    for (const s of servers) await s.stop().catch(() => undefined);
    if (!argv.keep) rmSync(work, { recursive: true, force: true });
    else log(`kept ${work}`);
  }
  R.finished = new Date().toISOString();
  R.loadAvgAtEnd = (await import('node:os')).loadavg().map((x) => round(x, 2));
  const md = report(R);
  mkdirSync(O.out, { recursive: true });
  const stamp = started.toISOString().replace(/[:.]/g, '-').slice(0, 19);
  const base = join(O.out, `bench-${quick ? 'quick-' : ''}${stamp}`);
  writeFileSync(`${base}.json`, JSON.stringify(R, null, 2) + '\n');
  writeFileSync(`${base}.md`, md + '\n');
  process.stdout.write(md + '\n');
  log(`wrote ${base}.json and ${base}.md`);
}

async function rssRun(s: Server, n: number, label: string): Promise<Record<string, unknown>> {
  log(`RSS across ${n} recoveries (${label})`);
  // Long enough for several library recycles (one per ~16 k recoveries by default): the isolates'
  // heaps and the allocator's arenas reach their working size during the first few.
  const warm = Math.min(100_000, Math.round(n / 10));
  const before = await s.stats();
  // No per-request timing here (load's timeSteps): its samples would be memory the daemon does not use.
  await load(s, { target: 'vault', op: 'recover', from: 0, to: O.users, load: { type: 'closed', concurrency: O.concurrency, count: warm }, connections: conns(O.concurrency) }, undefined, false);
  const afterWarm = await s.stats();
  const samples: { recoveries: number; rssMiB: number; t: number }[] = [];
  let done = 0;
  const t0 = performance.now();
  const timer = setInterval(() => {
    void s.stats().then((st) => samples.push({ recoveries: done, rssMiB: round(st.rss / 2 ** 20, 1), t: Math.round(performance.now() - t0) }));
  }, 2000);
  let lastLog = 0;
  const res = await load(s, { target: 'vault', op: 'recover', from: 0, to: O.users, load: { type: 'closed', concurrency: O.concurrency, count: n }, connections: conns(O.concurrency), progressEvery: 1000 }, (k) => {
    done = k;
    if (performance.now() - lastLog > 30_000) {
      lastLog = performance.now();
      log(`  ${k}/${n}`);
    }
  }, false);
  clearInterval(timer);
  const end = await s.stats();
  const mib = (b: number) => round(b / 2 ** 20, 1);
  const tail = samples.filter((x) => x.recoveries >= n / 2);
  // RSS saws up and down with the recycle, so one sample lands anywhere on the tooth: growth is
  // read between the medians of the first and the last tenth of the run (each spans several recycles).
  const first = median(samples.filter((x) => x.recoveries < n / 10).map((x) => x.rssMiB));
  const last = median(samples.filter((x) => x.recoveries >= n - n / 10).map((x) => x.rssMiB));
  const out = {
    recoveries: n,
    warmup: warm,
    rate: res.rate,
    errors: res.errors,
    rssMiB: {
      atStart: mib(before.rss),
      afterWarmup: mib(afterWarm.rss),
      atEnd: mib(end.rss),
      max: Math.max(...samples.map((x) => x.rssMiB), mib(end.rss)),
      medianFirstTenth: first,
      medianLastTenth: last,
    },
    growthMiB: round(last - first, 1),
    growthSingleSampleMiB: mib(end.rss - afterWarm.rss),
    slopeMiBPer100k: round(slope(tail.map((x) => ({ x: x.recoveries / 100_000, y: x.rssMiB }))), 2),
    pool: end.pool,
    samples,
  };
  log(`  RSS median ${first} → ${last} MiB (samples ${out.rssMiB.afterWarmup} → ${out.rssMiB.atEnd}, max ${out.rssMiB.max}), slope ${out.slopeMiBPer100k} MiB/100k`);
  return out;
}

function softhsmVersion(): string {
  try {
    return execFileSync('softhsm2-util', ['--version'], { encoding: 'utf8' }).trim();
  } catch {
    return '?';
  }
}

type Any = Record<string, any>; // eslint-disable-line @typescript-eslint/no-explicit-any

function report(R: Any): string {
  const out: string[] = [];
  const m = R.machine;
  out.push(`## Benchmark ${R.started}${R.options.quick ? ' (quick)' : ''}`);
  out.push('');
  out.push(`Machine: ${m.cpus} × ${m.cpuModel}, ${m.memGiB} GiB, Node ${m.node}, SoftHSM ${m.softhsm}, servers on ${m.malloc ?? 'libc'} malloc; load average at start ${m.loadAvgAtStart.join(' / ')}, at end ${R.loadAvgAtEnd.join(' / ')}.`);
  out.push(`HSM threads: ${R.options.threads}. Client Argon2id (SDK/peer): m=${R.kdf.m} KiB, t=${R.kdf.t}, p=${R.kdf.p}. ` +
    `${R.options.reps} interleaved round(s) of ${R.options.seconds} s per throughput figure (median), closed loop with ${R.options.concurrency} flows in flight.`);
  out.push('');
  const sb = R.sideBySide;
  if (sb) {
    const rows: (string | number)[][] = [];
    const cpu = (k: string) => (sb.serverCpuUsPerOp[k] !== undefined && Number.isFinite(sb.serverCpuUsPerOp[k]) ? `${sb.serverCpuUsPerOp[k]}` : '');
    const lat = (k: string) => {
      const rs = sb.runs[k] as LoadResult[] | undefined;
      return rs?.length ? `${median(rs.map((x) => x.latencyMs.p50))}` : '';
    };
    if (Number.isFinite(sb.median.ceiling)) rows.push([`(1) HSM ceiling, ${R.options.threads} threads`, sb.median.ceiling, '1.00', '', '', sb.reps.ceiling.join(' / ')]);
    if (Number.isFinite(sb.median.ceiling1)) rows.push(['    HSM ceiling, 1 thread', sb.median.ceiling1, '', '', '', '']);
    if (Number.isFinite(sb.median.ceilingAnchor)) rows.push([`    HSM ceiling, 1 thread, + 1 anchor write per recovery`, sb.median.ceilingAnchor, '', '', '', '']);
    rows.push(['(2) vault e2e recoveries/s', sb.median.vault, fmt(sb.vaultOverCeiling), cpu('vault'), lat('vault'), sb.reps.vault.join(' / ')]);
    rows.push(['    without the anchor write', sb.median.noAnchor, fmt(sb.median.noAnchor / sb.median.ceiling), cpu('noAnchor'), lat('noAnchor'), sb.reps.noAnchor.join(' / ')]);
    if (sb.reps.direct.length) rows.push(['    HSM calls on the main thread', sb.median.direct, fmt(sb.median.direct / sb.median.ceiling), cpu('direct'), lat('direct'), sb.reps.direct.join(' / ')]);
    if (sb.reps.peer.length) rows.push(['(3) OPAQUE peer logins/s', sb.median.peer, fmt(sb.median.peer / sb.median.ceiling), cpu('peer'), lat('peer'), sb.reps.peer.join(' / ')]);
    out.push(table(['throughput', 'median /s', '÷ ceiling', 'server CPU µs/op', 'p50 ms (closed loop)', 'rounds'], rows));
    out.push('');
    if (sb.bound) {
      const b = sb.bound;
      out.push(
        `Room on this machine: the ceiling's HSM calls cost ${b.hsmCpuUs} µs of CPU per recovery and the load generator ${b.loadgenCpuUs} µs, on the same ${b.cores} cores, ` +
          `so a daemon that cost nothing else would reach at most ${b.freeDaemon.perSec}/s (${fmt(b.freeDaemon.overCeiling)} of the ceiling). ` +
          `The vault spends ${b.daemonSelfCpuUs} µs per recovery beyond those calls; with the load generator on another machine its CPU would allow ${b.loadgenElsewhere.perSec}/s (${fmt(b.loadgenElsewhere.overCeiling)}).`,
      );
      out.push('');
    }
    out.push(`Anchor cost: ${pct(sb.anchorCost)} of recover throughput. Worker threads vs main thread: ×${fmt(sb.vaultOverDirect)}. Vault recoveries vs peer logins: ×${fmt(sb.vaultOverPeer)}. ` +
      `Load generator CPU µs per flow: ${JSON.stringify(sb.loadgenCpuUsPerOp)}.`);
    out.push('');
  }
  if (R.latency) {
    const rows: (string | number)[][] = [];
    for (const p of LATENCY_LOADS.map(String)) {
      const l = R.latency[p];
      if (!l) continue;
      const v = l.vault as LoadResult;
      const loop = (x: LoadResult) => (x.serverLoop ? `${round(x.serverLoop.delayP99Ms, 1)} / ${round(x.serverLoop.delayMaxMs, 1)} / ${x.serverLoop.gcMaxMs}` : '');
      const steps = (x: LoadResult) =>
        ['recover.begin', 'recover.finish']
          .map((m) => x.daemonStepMs?.[m])
          .map((q) => (q ? `${q.p50} / ${q.p99}` : '–'))
          .join(', ');
      rows.push([p === '5' ? '5 % (floor)' : `${p} %`, l.rate, 'vault (workers)', v.rate, v.latencyMs.p50, v.latencyMs.p99, v.latencyMs.p999, errs(v.errors), steps(v), loop(v)]);
      if (l.direct) rows.push(['', '', 'HSM on main thread', l.direct.rate, l.direct.latencyMs.p50, l.direct.latencyMs.p99, l.direct.latencyMs.p999, errs(l.direct.errors), steps(l.direct), loop(l.direct)]);
    }
    out.push(
      table(
        ['load', 'offered /s', 'daemon', 'achieved /s', 'p50 ms', 'p99 ms', 'p99.9 ms', 'errors', 'in the daemon p50 / p99 ms: begin, finish', 'event-loop delay p99 / max, longest GC (ms)'],
        rows,
      ),
    );
    out.push('');
  }
  const extra: (string | number)[][] = [];
  if (R.enroll) extra.push(['enrolments/s (closed loop)', R.enroll.rate, `p50 ${R.enroll.latencyMs.p50} ms, server CPU ${R.enroll.serverCpuUsPerOp} µs/op`]);
  if (R.enrolSetup) extra.push([`enrolments/s (set-up of ${R.options.users}, 32 in flight)`, R.enrolSetup.rate, '']);
  if (R.sdkRecover) extra.push(['recoveries/s, real SDK client (client-side OPRF + Argon2id)', R.sdkRecover.rate, `p50 ${R.sdkRecover.latencyMs.p50} ms, load-generator CPU ${Math.round((R.sdkRecover.loadgenCpuMs * 1000) / Math.max(1, R.sdkRecover.total))} µs/op`]);
  if (R.hsmSingleThreadOpsPerSec) extra.push(['HSM single calls/s, 1 thread', '', JSON.stringify(R.hsmSingleThreadOpsPerSec)]);
  if (extra.length) {
    out.push(table(['other', 'value', 'notes'], extra));
    out.push('');
  }
  if (R.rss) {
    const rows = [R.rss, R.rssNoRecycle].filter(Boolean).map((r: Any, i: number) => [
      i === 0 ? 'HSM recycle on (default)' : 'HSM recycle off',
      `${r.warmup ?? ''} + ${r.recoveries}`,
      r.rate,
      r.rssMiB.medianFirstTenth ?? '',
      r.rssMiB.medianLastTenth ?? '',
      r.growthMiB,
      `${r.rssMiB.afterWarmup} → ${r.rssMiB.atEnd} (${r.growthSingleSampleMiB ?? r.growthMiB})`,
      r.rssMiB.max,
      r.slopeMiBPer100k,
      r.pool ? `${r.pool.recycles} (max ${r.pool.recycleMsMax} ms)` : '',
    ]);
    out.push(table(['memory', 'warm-up + recoveries', 'rate /s', 'RSS median, first 10 % MiB', 'last 10 % MiB', 'growth MiB', 'single samples after warm-up → end (growth)', 'max MiB', 'slope MiB/100k (2nd half)', 'recycles'], rows));
    out.push('');
  }
  if (R.scale) {
    const s = R.scale;
    out.push(table(['scale', `${s.records.small} records`, `${s.records.big} records`, 'ratio'], [
      ['start-up (spawn → listening), median ms', s.startupMedianMs.small, s.startupMedianMs.big, ''],
      ['database bytes per record', s.dbBytesPerRecord.small, s.dbBytesPerRecord.big, ''],
      ['recoveries/s (random users over all records)', s.recoverMedian.small, s.recoverMedian.big, fmt(s.bigOverSmall)],
      ...(s.cpuUsPerOpMedian
        ? [['server CPU µs per recovery', s.cpuUsPerOpMedian.small, s.cpuUsPerOpMedian.big, fmt(s.cpuUsPerOpMedian.small / s.cpuUsPerOpMedian.big)]]
        : []),
    ]));
    out.push('');
    out.push(`Recover rounds (/s): ${s.records.small} records ${s.recoverRates.small.join(' / ')}; ${s.records.big} records ${s.recoverRates.big.join(' / ')}.`);
    out.push('');
    out.push('');
    if (R.bulk) out.push(`Bulk load: ${R.bulk.loaded} records in ${R.bulk.seconds} s (${R.bulk.perSec}/s; HSM ${R.bulk.hsmSec} s, SQLite+ledger ${R.bulk.dbSec} s).`);
    out.push('');
  }
  return out.join('\n');
}

const fmt = (x: number) => (Number.isFinite(x) ? x.toFixed(2) : '–');
const pct = (x: number) => (Number.isFinite(x) ? `${(x * 100).toFixed(1)} %` : '–');
const errs = (e: Record<string, number>) => Object.entries(e ?? {}).map(([k, v]) => `${k}×${v}`).join(' ') || '0';

main().catch((e: unknown) => {
  process.stderr.write(`bench failed: ${(e as Error).stack ?? e}\n`);
  process.exit(1);
});
